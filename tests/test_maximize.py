"""Coordinated activation maximisation (usae.analysis.maximize) on tiny random-init backbones.

The run directory comes from the real stages: demo photos -> `run_extract` (tiny random-init
dinov2 + siglip, fp32) -> `run_train` (a short run), so the backbones are rebuilt from what
the store recorded, exactly as a user's run would be.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner
from usae.analysis import canvas as cv
from usae.analysis import maximize as mx
from usae.analysis import objective as ob
from usae.analysis.backbones import Target
from usae.analysis.cli import register_maximize
from usae.pipeline.backbone import load_backbone
from usae.pipeline.demo_images import build_demo_images
from usae.pipeline.extract import ExtractConfig, run_extract
from usae.pipeline.images import load_image
from usae.pipeline.manifest import build_manifest, write_manifest
from usae.pipeline.registry import resolve
from usae.pipeline.store import Store
from usae.trainer.model import USAE, ModelSpec, load_run
from usae.trainer.train import TrainConfig, run_train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
KEYS = ("dinov2", "siglip")
GRID = (7, 7)
M_CONCEPTS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(key: str, seed: int = 0):
    return load_backbone(resolve(key), random_init=True, seed=seed, tiny=True)


def _extract(manifest: Path, store: Path, **kw) -> Store:
    cfg = ExtractConfig(
        manifest=manifest, store=store, backbones=KEYS, tiny=True, random_init=True, dtype="fp32",
        device="cpu", grid=GRID, chunk_images=4, batch_size=4, progress=False, **kw,
    )  # fmt: skip
    run_extract(cfg)
    return Store.open(store)


def _manifest_of(folder: Path) -> Path:
    return write_manifest(build_manifest(folder, show_progress=False), folder / "manifest.csv")


@pytest.fixture(scope="module")
def backbones():
    return {k: _tiny(k) for k in KEYS}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("mx_store")
    manifest = build_demo_images(base / "demo", n=8, seed=0, show_progress=False)
    return _extract(manifest, base / "s.zarr")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, store):
    out = tmp_path_factory.mktemp("mx_run") / "run"
    # a random unit start: the thresholds below were calibrated on this 40-step run's concepts
    # (the maximiser is under test here, not the recipe's start)
    cfg = TrainConfig(
        store=str(store.path), out=str(out), concepts=M_CONCEPTS, k=4, steps=40, batch_tokens=98,
        lr=3e-3, lr_min=3e-4, warmup_steps=4, holdout=0.25, dtype="fp32", device="cpu",
        log_every=20, ckpt_every=0, init="unit",
    )  # fmt: skip
    run_train(cfg)
    return out


def _cfg(run: Path, out: Path, **kw) -> mx.MaximizeConfig:
    base = dict(run=run, out=out, concepts=(5,), steps=40, canvas=96, crops=3, seed=0)
    base.update(kw)
    return mx.MaximizeConfig(**base)


@pytest.fixture(scope="module")
def result(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mx_out")
    return mx.run_maximize(_cfg(run_dir, out), progress=False)


# ---------------------------------------------------------------- pieces against slow versions
def _random_bn_model(seed: int, m: int = 16, widths=(8, 12)) -> USAE:
    torch.manual_seed(seed)
    model = USAE(ModelSpec(("a", "b"), widths, (0.3, -0.2), (1.7, 0.6), m, 3))
    for bn in model.bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return model.eval()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(0, 15),
    i=st.integers(0, 1),
    b=st.integers(1, 3),
    t=st.integers(1, 5),
)
def test_concept_pre_equals_encode_pre(seed, k, i, b, t):
    model = _random_bn_model(seed)
    acts_btd = (
        torch.randn(b, t, model.spec.widths[i], generator=torch.Generator().manual_seed(seed)) * 3
    )
    want = model.encode_pre(i, model.standardize(i, acts_btd.reshape(b * t, -1)))[:, k].reshape(
        b, t
    )
    torch.testing.assert_close(ob.concept_pre(model, i, k, acts_btd), want, rtol=1e-5, atol=1e-5)


def test_concept_pre_refuses_training_mode():
    model = _random_bn_model(0).train()
    with pytest.raises(ValueError, match="eval mode"):  # the model's own check (USAE.encode_pre)
        ob.concept_pre(model, 0, 0, torch.zeros(1, 1, 8))


def test_crop_resize_equals_slicing_when_pixel_aligned():
    img_3hw = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    # side 0.5 of 64 px = 32 px; centre -0.25 (x) and 0.375 (y) put the box at x 8..40, y 28..60
    boxes = torch.tensor([[0.5, -0.25, 0.375], [0.5, 0.0, 0.0]])
    crops = cv.crop_resize(img_3hw, boxes, 32)
    torch.testing.assert_close(crops[0], img_3hw[:, 28:60, 8:40])
    torch.testing.assert_close(crops[1], img_3hw[:, 16:48, 16:48])
    # a resized crop: the same region through the obvious path (slice, then bilinear resize)
    slow = torch.nn.functional.interpolate(
        img_3hw[None, :, 16:48, 16:48], size=(16, 16), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(cv.crop_resize(img_3hw, boxes[1:], 16), slow, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lo=st.floats(0.05, 1.0),
    span=st.floats(0.0, 1.0),
    n=st.integers(1, 8),
)
def test_boxes_inside_canvas_with_requested_area(seed, lo, span, n):
    hi = min(1.0, lo + span)
    boxes = cv.sample_boxes(n, (lo, hi), torch.Generator().manual_seed(seed))
    half, cx, cy = boxes.T
    area = half**2
    assert torch.all(area >= lo - 1e-6) and torch.all(area <= hi + 1e-6)
    assert torch.all(cx.abs() + half <= 1 + 1e-6) and torch.all(cy.abs() + half <= 1 + 1e-6)


def test_priors_are_the_photos_statistics():
    pri = cv.natural_priors(64)
    # slow version of the colour matrix: C @ C.T is the photos' RGB covariance (up to the scale)
    pix = np.concatenate([cv._square(p, 64).reshape(-1, 3) for p in cv._photos()])
    cov = np.cov(pix, rowvar=False)
    cc = pri.colour_33.astype(np.float64) @ pri.colour_33.T.astype(np.float64)
    np.testing.assert_allclose(cc / cc[0, 0], cov / cov[0, 0], rtol=1e-4)
    assert np.abs(pri.colour_33).max() <= 1.0 + 1e-6
    assert pri.magnitude_3hf.shape == (3, 64, 33) and pri.magnitude_3hf[:, 0, 0].max() == 0.0
    # natural images: much more energy at low than at high spatial frequencies
    assert pri.magnitude_3hf[0, 1:4, 1:4].mean() > 10 * pri.magnitude_3hf[0, 24:32, 24:32].mean()


def test_phase_images_keep_the_magnitude_spectrum():
    imgs = cv.PhaseImages(2, 64, torch.Generator().manual_seed(3))
    pri = cv.natural_priors(64)
    with torch.no_grad():
        for j in range(2):
            img = imgs(j).double()
            assert img.shape == (3, 64, 64) and img.min() >= 0 and img.max() <= 1
            # undo sigmoid and colour mixing: the decorrelated channels' spectrum is the prior's
            z = torch.linalg.solve(
                torch.from_numpy(pri.colour_33).double(),
                torch.logit(img).reshape(3, -1) / cv.CONTRAST,
            )
            mag = torch.fft.rfft2(z.reshape(3, 64, 64), norm="ortho").abs()[:, :, 1:-1]
            ref = torch.from_numpy(pri.magnitude_3hf).double()[:, :, 1:-1]
            for c in range(3):  # each channel is standardised on its own: one scale per channel
                ratio = (mag[c] / ref[c].clamp_min(1e-12))[ref[c] > 1e-2 * ref[c].max()]
                torch.testing.assert_close(
                    ratio, torch.full_like(ratio, ratio.median().item()), rtol=1e-2, atol=0
                )
    assert not torch.equal(imgs(0), imgs(1))


# ---------------------------------------------------------------- the optimisation on a run
def _random_phase_objective(model, i, k, bb, cfg, n=4):
    """Objective of random-phase images with the same spectrum, on the evaluation crops."""
    boxes = cv.sample_boxes(
        cfg.crops, cfg.crop_scale, torch.Generator().manual_seed(ob._concept_seed(cfg.seed, k, 1))
    )
    vals = []
    with torch.no_grad():
        for s in range(n):
            img = cv.PhaseImages(1, cfg.canvas, torch.Generator().manual_seed(1000 + s))(0)
            vals.append(
                ob.concept_objective(bb, model, i, k, cv.crop_resize(img, boxes, 224), GRID)
                .mean()
                .item()
            )
    return np.array(vals)


def test_objective_rises_above_random_phase_images(result, run_dir):
    model, _ = load_run(run_dir)
    (c,) = result.concepts
    cfg = _cfg(run_dir, result.out)
    for i, key in enumerate(KEYS):
        curve = np.asarray(c.curve[key])
        assert curve.shape == (cfg.steps,)
        assert curve[-8:].mean() > 1.5 * curve[:8].mean() + 1e-3, (key, curve)
        rand = _random_phase_objective(model, i, c.concept, _tiny(key), cfg)
        fin = c.final[key]
        assert fin.crops > 2.5 * rand.max(), (key, fin, rand)
        assert fin.crops > 1.5 * fin.random_crops, (key, fin)
        assert fin.full > fin.random_full, (key, fin)


def test_objective_is_what_extraction_gives(result, run_dir, backbones, tmp_path):
    """The optimised PNGs, through `run_extract` (store, float16) + standardise + encode_pre, give
    the objective that the differentiable path used by the optimisation computes."""
    model, _ = load_run(run_dir)
    (c,) = result.concepts
    k = c.concept
    folder = tmp_path / "pngs"
    folder.mkdir()
    for key in KEYS:
        shutil.copy(c.images[key], folder / f"{key}.png")
    store = _extract(_manifest_of(folder), tmp_path / "png.zarr")
    ids = list(store.image_ids)
    for i, key in enumerate(KEYS):
        img = torch.from_numpy(load_image(c.images[key]).copy()).permute(2, 0, 1).float() / 255
        img.requires_grad_(True)
        obj = ob.concept_objective(backbones[key], model, i, k, img[None], GRID)
        obj.sum().backward()
        assert img.grad is not None and img.grad.abs().sum() > 0  # a real gradient path
        rows = torch.from_numpy(store.read_chunk(key, 0).astype(np.float32)).reshape(
            len(ids), -1, store.widths[key]
        )
        with torch.no_grad():
            pre = model.encode_pre(i, model.standardize(i, rows[ids.index(key)]))[:, k]
            other = model.encode_pre(i, model.standardize(i, rows[1 - ids.index(key)]))[:, k]
        want = torch.relu(pre).mean()
        torch.testing.assert_close(
            obj.detach()[0], want, rtol=1e-2, atol=1e-3
        )  # the store is float16
        assert abs(torch.relu(other).mean() - want) > 1e-2  # the comparison can tell images apart


def test_gradient_matches_finite_differences(run_dir):
    """d objective / d phase by autograd equals a central finite difference (float64 models)."""
    model, _ = load_run(run_dir)
    model = model.double()
    bb = load_backbone(resolve("siglip"), random_init=True, seed=0, tiny=True, dtype=torch.float64)
    imgs = cv.PhaseImages(1, 32, torch.Generator().manual_seed(0)).double()
    direction = torch.randn(
        imgs.phase_n3hf.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    def f() -> torch.Tensor:
        return (
            ob.concept_objective(bb, model, 1, 3, imgs(0)[None], GRID).sum()
            + ob.concept_pre(model, 1, 3, bb(imgs(0)[None], grid=GRID).patch_btd).mean()
        )

    f().backward()
    analytic = (imgs.phase_n3hf.grad * direction).sum().item()
    eps = 1e-3  # the backbone normalises in float32: a smaller step drowns in rounding
    with torch.no_grad():
        imgs.phase_n3hf += eps * direction
        up = f().item()
        imgs.phase_n3hf -= 2 * eps * direction
        down = f().item()
    assert analytic != 0
    assert abs((up - down) / (2 * eps) - analytic) <= 2e-3 * max(1.0, abs(analytic))


def test_outputs_valid_and_deterministic(result, run_dir, tmp_path):
    cfg = _cfg(run_dir, result.out)
    (c,) = result.concepts
    d = result.out / str(c.concept)
    for key in KEYS:
        img = Image.open(d / f"{key}.png")
        assert img.mode == "RGB" and img.size == (cfg.canvas, cfg.canvas)
        a = np.asarray(img)
        assert a.dtype == np.uint8 and a.std() > 5  # an image, not a flat colour
    for name in ("panel.png", "objective.png"):
        with Image.open(d / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    blob = json.loads((d / "objective.json").read_text())
    assert blob["concept"] == c.concept and blob["backbones"] == list(KEYS)
    assert all(len(blob["curve"][k]) == cfg.steps for k in KEYS)
    saved = json.loads((result.out / "config.json").read_text())
    assert saved["steps"] == cfg.steps and saved["concepts"] == [c.concept]
    # same seed -> byte-identical images; another seed -> other images
    again = mx.run_maximize(_cfg(run_dir, tmp_path / "a"), progress=False)
    other = mx.run_maximize(_cfg(run_dir, tmp_path / "b", seed=1, steps=3), progress=False)
    for key in KEYS:
        assert (d / f"{key}.png").read_bytes() == again.concepts[0].images[key].read_bytes()
        assert (d / f"{key}.png").read_bytes() != other.concepts[0].images[key].read_bytes()
    assert again.concepts[0].curve == c.curve


# ---------------------------------------------------------------- command line and bad input
def _cli(*args: str):
    """`usae maximize ...` through the real application (registered by usae.analysis.cli)."""
    from usae.cli import app

    return CliRunner().invoke(app, ["maximize", *map(str, args)])


def _fails(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    for n in needles:
        assert n in text, (n, res.output)


def test_cli_runs_and_writes_the_panel(run_dir, tmp_path):
    res = _cli("--run", run_dir, "--concept", 7, "--out", tmp_path / "o", "--steps", 2, "--canvas", 48, "--crops", 1,
               "--crop-scale", 0.5, 0.6, "--noise", 0, "--schedule", "constant", "--lr", 0.5)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "7" / "panel.png").exists() and "concept 7" in res.output
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (
        saved["crop_scale"] == [0.5, 0.6] and saved["schedule"] == "constant" and saved["lr"] == 0.5
    )


def test_cli_options_mirror_config_fields():
    app = typer.Typer()
    app.callback()(lambda: None)
    register_maximize(app)
    cmd = typer.main.get_command(app).commands["maximize"]
    opts = {p.name for p in cmd.params}
    fields = {f.name for f in mx.MaximizeConfig.__dataclass_fields__.values()}
    assert opts == fields
    by_name = {p.name: p for p in cmd.params}
    assert (
        by_name["concepts"].opts == ["--concept"] and by_name["concepts"].multiple
    )  # `--concept K`, repeatable


@pytest.mark.parametrize("k", [M_CONCEPTS, -1, 10_000])
def test_unknown_concept_is_refused(run_dir, tmp_path, k):
    _fails(
        _cli("--run", run_dir, "--concept", k, "--out", tmp_path / "o"),
        "unknown concept id",
        f"{M_CONCEPTS} concepts",
    )
    assert not (tmp_path / "o").exists()


def test_bad_options_are_refused(run_dir, tmp_path):
    _fails(_cli("--run", run_dir, "--out", tmp_path / "o"), "nothing to do")
    _fails(
        _cli("--run", run_dir, "--concept", 1, "--out", tmp_path / "o", "--top", 3),
        "--top needs --report",
    )
    _fails(_cli("--run", run_dir, "--concept", 1, "--out", tmp_path / "o", "--steps", 0), "--steps")
    _fails(
        _cli("--run", tmp_path / "nope", "--concept", 1, "--out", tmp_path / "o"),
        "not a usae run directory",
    )
    junk = _copy_run(run_dir, tmp_path / "junk")
    (junk / "model.safetensors").write_bytes(b"not a safetensors file")
    _fails(_cli("--run", junk, "--concept", 1, "--out", tmp_path / "o"), "model.safetensors")
    (junk / "config.json").write_text("{}")
    _fails(_cli("--run", junk, "--concept", 1, "--out", tmp_path / "o"), "not a usae run config")
    _fails(
        _cli("--run", run_dir, "--concept", 1, "--out", tmp_path / "o", "--weights", "vit=x.pt"),
        "does not exist",
    )
    (tmp_path / "w.safetensors").write_bytes(b"")
    _fails(_cli("--run", run_dir, "--concept", 1, "--out", tmp_path / "o", "--weights", f"vit={tmp_path / 'w.safetensors'}"),
           "not in the run")  # fmt: skip


def _copy_run(run_dir: Path, dst: Path, **store_entry) -> Path:
    shutil.copytree(run_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["store"].update(store_entry)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_backbone_missing_from_store_is_refused(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["backbones"] = ["dinov2", "clip"]
    (run / "config.json").write_text(json.dumps(cfg))
    _fails(
        _cli("--run", run, "--concept", 1, "--out", tmp_path / "o"),
        "['clip']",
        "missing from the store",
    )


def _save_weights(bb, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return path


def test_unavailable_or_wrong_weights_are_refused(run_dir, store, tmp_path):
    # a store extracted with dinov2 weights from a file: without the file they cannot be had
    f3 = _save_weights(_tiny("dinov2", seed=3), tmp_path / "d3.safetensors")
    st3 = _extract(
        _manifest_of(_pngs(tmp_path)), tmp_path / "w.zarr", weights=(("dinov2", str(f3)),)
    )
    run = _copy_run(
        run_dir, tmp_path / "run", path=str(st3.path), fingerprint=st3.attrs["fingerprint"]
    )
    _fails(
        _cli("--run", run, "--concept", 1, "--out", tmp_path / "o"),
        "'dinov2'",
        "cannot be had",
        "--weights dinov2=FILE",
    )
    # a weights file whose sha256 is not the recorded one
    f1 = _save_weights(_tiny("dinov2", seed=1), tmp_path / "d1.safetensors")
    _fails(_cli("--run", run, "--concept", 1, "--out", tmp_path / "o", "--weights", f"dinov2={f1}"),
           "not the ones the store was extracted with")  # fmt: skip
    # the right file is accepted
    res = _cli("--run", run, "--concept", 1, "--out", tmp_path / "ok", "--steps", 1, "--canvas", 32, "--crops", 1,
               "--weights", f"dinov2={f3}")  # fmt: skip
    assert res.exit_code == 0, res.output
    # a store whose recorded seed does not give the recorded weights
    lying = tmp_path / "lying.zarr"
    shutil.copytree(store.path, lying)
    grp = zarr.open_group(str(lying / "backbones" / "siglip"), mode="r+")
    spec = dict(grp.attrs["spec"])
    spec["identity"] = {**spec["identity"], "seed": 5}
    grp.attrs["spec"] = spec
    run = _copy_run(run_dir, tmp_path / "run2", path=str(lying))
    _fails(
        _cli("--run", run, "--concept", 1, "--out", tmp_path / "o"),
        "'siglip'",
        "not the ones the store was extracted with",
    )


def _pngs(tmp_path: Path) -> Path:
    """A folder with two small random pictures (for a second, tiny extraction)."""
    folder = tmp_path / "two"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{n}.png")
    return folder


def test_store_of_another_run_is_refused(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run", fingerprint="0123456789abcdef")
    _fails(_cli("--run", run, "--concept", 1, "--out", tmp_path / "o"), "not the run's store")
    run = _copy_run(run_dir, tmp_path / "run3", path=str(tmp_path / "gone.zarr"))
    _fails(_cli("--run", run, "--concept", 1, "--out", tmp_path / "o"), "was not found", "--store")


def test_top_concepts_from_report(run_dir, tmp_path):
    import pandas as pd

    rep = tmp_path / "rep"
    rep.mkdir()
    imp = np.linspace(0, 1, M_CONCEPTS)[::-1].copy()
    imp[[3, 11]] = [5.0, 7.0]
    pd.DataFrame({"concept": np.arange(M_CONCEPTS), "importance": imp}).to_parquet(
        rep / "concepts.parquet"
    )
    assert mx.top_concepts(rep, 3) == [11, 3, 0]
    cfg = _cfg(run_dir, tmp_path / "o", concepts=(3, 2), top=2, report=rep)
    assert mx.select_concepts(cfg, M_CONCEPTS) == [3, 2, 11]
    _fails(
        _cli("--run", run_dir, "--out", tmp_path / "o", "--top", 2, "--report", tmp_path),
        "no concepts.parquet",
    )


@settings(max_examples=15, deadline=None)
@given(
    keys=st.lists(
        st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,8}", fullmatch=True),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    canvas=st.integers(16, 48),
    steps=st.integers(1, 6),
    seed=st.integers(0, 1000),
    k=st.integers(0, 10_000),
)
def test_written_outputs_round_trip(tmp_path_factory, keys, canvas, steps, seed, k):
    """PNGs hold exactly the rendered canvases; objective.json holds exactly the curve and finals."""
    cfg = mx.MaximizeConfig(
        run=Path("r"),
        out=Path("o"),
        concepts=(k,),
        steps=steps,
        canvas=canvas,
        seed=seed,
        device="cpu",
    )
    targets = [Target(key, i, None) for i, key in enumerate(keys)]  # rendering needs no backbone
    mz = ob.Maximizer(None, targets, k, cfg, GRID)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    curve_sb = rng.random((steps, len(keys)))
    finals = [ob.Final(*map(float, rng.random(4))) for _ in keys]
    out = tmp_path_factory.mktemp("rt")
    res = mx.write_concept(out, k, mz, curve_sb, finals)
    for key, want in zip(keys, mz.canvases(), strict=True):
        got = np.asarray(Image.open(out / str(k) / f"{key}.png"))
        assert got.shape == (canvas, canvas, 3) and np.array_equal(got, want)
        assert res.images[key] == out / str(k) / f"{key}.png"
    blob = json.loads((out / str(k) / "objective.json").read_text())
    assert blob["concept"] == k and blob["backbones"] == keys and blob["steps"] == steps
    for j, key in enumerate(keys):
        assert blob["curve"][key] == curve_sb[:, j].tolist()
        assert ob.Final(**blob["final"][key]) == finals[j]


def test_bf16_backbone_gives_a_gradient(run_dir):
    """The bf16 path (what --dtype auto picks for a bf16 store): phases move, objective finite."""
    model, _ = load_run(run_dir)
    bb = load_backbone(resolve("dinov2"), random_init=True, seed=0, tiny=True, dtype=torch.bfloat16)
    cfg = mx.MaximizeConfig(
        run=run_dir, out=Path("o"), concepts=(2,), steps=3, canvas=48, crops=2, device="cpu"
    )
    mz = ob.Maximizer(model, [Target("dinov2", 0, bb)], 2, cfg, GRID)
    before = mz.images.phase_n3hf.detach().clone()
    vals = [mz.step()[0] for _ in range(3)]
    assert np.all(np.isfinite(vals))
    assert mz.images.phase_n3hf.grad is not None and mz.images.phase_n3hf.grad.abs().sum() > 0
    assert not torch.equal(before, mz.images.phase_n3hf.detach())


def test_maximize_into_a_report_renders_its_pages(run_dir, store, tmp_path):
    """analyze once, then maximize into REPORT/maximize: the report's pages show the panel
    (render only: metrics.json and concepts.parquet are left as analyze wrote them)."""
    from usae.analysis.report import AnalyzeConfig, run_analyze

    rep = tmp_path / "report"
    run_analyze(
        AnalyzeConfig(run=str(run_dir), store=str(store.path), out=str(rep), top_concepts=1),
        progress=False,
    )
    data = {f: (rep / f).read_bytes() for f in ("metrics.json", "concepts.parquet")}
    m = json.loads(data["metrics.json"])
    free = next(c for c in range(64) if str(c) not in m["top_images"])  # no top image: no photo
    shown = m["top_concepts"]["importance"][0]  # a concept with a page
    res = mx.run_maximize(
        _cfg(run_dir, rep / "maximize", concepts=(shown, free), steps=2, canvas=48, crops=1),
        progress=False,
    )
    assert res.report == rep / "index.html"
    page = (rep / "concepts" / f"{shown}.html").read_text()
    assert f"../maximize/{shown}/panel.png" in page and "Activation maximisation" in page
    assert f'href="concepts/{shown}.html"' in (rep / "index.html").read_text()
    assert {f: (rep / f).read_bytes() for f in data} == data
    # the store records its manifest: analyze showed photos, and a concept of the report's gets
    # its top photo first in its panel (without --manifest); a --manifest that is not there is refused
    assert m["photos"] is True and m["warnings"] == []
    k = m["top_concepts"]["importance"][0]
    mx.run_maximize(
        _cfg(run_dir, rep / "maximize", concepts=(k,), steps=1, canvas=48, crops=1), progress=False
    )
    obj = json.loads((rep / "maximize" / str(k) / "objective.json").read_text())
    assert obj["photo"] == m["top_images"][str(k)][0]["image_id"]
    assert (
        json.loads((rep / "maximize" / str(free) / "objective.json").read_text())["photo"] is None
    )
    from PIL import Image

    assert (
        Image.open(rep / "maximize" / str(k) / "panel.png").width
        > Image.open(rep / "maximize" / str(free) / "panel.png").width
    )  # one more image: the photo
    with pytest.raises(mx.MaximizeError, match="cannot read manifest"):
        mx.run_maximize(
            _cfg(run_dir, rep / "maximize", concepts=(k,), steps=1, canvas=48, crops=1,
                 manifest=tmp_path / "none.csv"),
            progress=False,
        )  # fmt: skip
    # elsewhere, nothing is rendered
    assert (
        mx.run_maximize(
            _cfg(run_dir, tmp_path / "o", concepts=(9,), steps=1, canvas=48, crops=1),
            progress=False,
        ).report
        is None
    )
