"""`usae extract` / `usae info`: the store holds exactly what the backbones compute, aligned
row by row across backbones; weights files, failures, resume after SIGKILL, Dask workers,
and the CLI from manifest to info."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner
from usae.pipeline.backbone import load_backbone
from usae.pipeline.extract import ExtractConfig, ExtractError, TooManyFailures, run_extract
from usae.pipeline.images import load_image
from usae.pipeline.registry import resolve
from usae.pipeline.store import Store, StoreError

from usae.cli import app
from usae.errors import USER_ERROR_EXIT

torch.set_num_threads(1)
TINY = {"tiny": True, "random_init": True, "dtype": "fp32", "progress": False}


def _cfg(images, store: Path, **kw) -> ExtractConfig:
    return ExtractConfig(manifest=images.manifest, store=store, **{**TINY, **kw})


def direct_tokens(bb, path: Path, grid=(14, 14)) -> tuple[np.ndarray, np.ndarray]:
    """One image through one backbone, outside the pipeline (the slow, obvious version)."""
    x_13hw = torch.from_numpy(load_image(path).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        acts = bb(x_13hw, grid)
    return acts.patch_btd[0].to(torch.float16).numpy(), acts.prefix_bpd[0].to(torch.float16).numpy()


def assert_same_store(a: Store, b: Store) -> None:
    assert list(a.image_ids) == list(b.image_ids) and a.backbones == b.backbones
    np.testing.assert_array_equal(a.valid, b.valid)
    assert a.failures == b.failures and a.attrs["fingerprint"] == b.attrs["fingerprint"]
    for k in a.backbones:
        for i in range(a.n_chunks):
            assert a.read_chunk(k, i).tobytes() == b.read_chunk(k, i).tobytes(), (k, i)
        if a.prefix_tokens[k]:
            np.testing.assert_array_equal(
                a.read_prefix(k, 0, a.n_images), b.read_prefix(k, 0, b.n_images)
            )
        assert a.stats(k) == b.stats(k)


def test_store_rows_are_each_images_tokens_in_every_backbone(image_set, tmp_path) -> None:
    """Alignment: row image*T + t of every group is image `image`, position t, of that backbone."""
    cfg = _cfg(image_set, tmp_path / "s.zarr", chunk_images=4, batch_size=3, max_failures=0.5)
    summary = run_extract(cfg)
    st = Store.open(cfg.store)
    assert summary.n_images == st.n_images == 10 and summary.failed == 1 and summary.computed == 10
    assert st.backbones == ["dinov2", "siglip", "vit"] and st.tokens_per_image == 196
    t = st.tokens_per_image
    bad = image_set.image_ids.index(image_set.bad[0])
    assert st.failures == [
        {
            "image_id": image_set.bad[0],
            "path": image_set.paths[bad],
            "reason": "not an image (unrecognised format)",
        }
    ]
    assert list(st.valid) == [i != bad for i in range(10)]
    for key in st.backbones:
        bb = load_backbone(resolve(key), random_init=True, tiny=True)
        assert st.spec(key)["identity"] == bb.identity
        rows = st.read_rows(key, 0, st.n_rows)
        prefix = st.read_prefix(key, 0, st.n_images)
        for i, rel in enumerate(image_set.paths):
            got = rows[i * t : (i + 1) * t]
            if i == bad:
                assert not got.any()
                continue
            patch, pre = direct_tokens(bb, image_set.root / rel)
            np.testing.assert_allclose(
                got.astype(np.float32), patch.astype(np.float32), atol=2e-3, rtol=2e-3
            )
            if prefix is not None:
                np.testing.assert_allclose(
                    prefix[i].astype(np.float32), pre.astype(np.float32), atol=2e-3, rtol=2e-3
                )
        s = st.stats(key)
        assert s["count"] == 9 * t
        valid_rows = np.repeat(st.valid, t)
        np.testing.assert_allclose(
            s["mean"], rows[valid_rows].astype(np.float64).mean(0), rtol=1e-9, atol=1e-12
        )


def test_weights_file_gives_exactly_that_models_activations(shared_image_set, tmp_path) -> None:
    src = load_backbone(resolve("vit"), random_init=True, tiny=True, seed=123)
    f = tmp_path / "vit_weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(f))
    cfg = _cfg(
        shared_image_set, tmp_path / "w.zarr", backbones=("vit",), weights=(("vit", str(f)),),
        random_init=False, batch_size=1, chunk_images=5,
    )  # fmt: skip
    run_extract(cfg)
    st = Store.open(cfg.store)
    ident = st.spec("vit")["identity"]
    assert (
        ident["weights"] == "file:vit_weights.safetensors"
        and ident["sha256"] == src.identity["sha256"]
    )
    assert not ident["random_init"]
    rows = st.read_rows("vit", 0, st.n_rows)
    for i, rel in enumerate(shared_image_set.paths):
        patch, pre = direct_tokens(src, shared_image_set.root / rel)
        assert rows[i * 196 : (i + 1) * 196].tobytes() == patch.tobytes()
        np.testing.assert_array_equal(st.read_prefix("vit", i, i + 1)[0], pre)


def test_missing_weights_fail_fast_with_both_ways_out(shared_image_set, tmp_path) -> None:
    runner = CliRunner()
    args = [
        "extract",
        "-m",
        str(shared_image_set.manifest),
        "-s",
        str(tmp_path / "x.zarr"),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    res = runner.invoke(app, args)
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "--weights dinov2=FILE" in text and "--random-init" in text
    assert elapsed < 3.0
    assert not (tmp_path / "x.zarr").exists()  # nothing created before the weights are there


def test_too_many_failures_exit_nonzero_but_store_is_complete(image_set, tmp_path) -> None:
    cfg = _cfg(image_set, tmp_path / "f.zarr", backbones=("siglip",), chunk_images=3)
    with pytest.raises(TooManyFailures, match="1 of 10 images failed"):
        run_extract(cfg)  # 10% > the default 1%
    st = Store.open(cfg.store)
    assert st.complete and int(st.valid.sum()) == 9
    res = CliRunner().invoke(app, ["extract", "-m", str(cfg.manifest), "-s", str(cfg.store), "--tiny", "--random-init",
                                   "--dtype", "fp32", "--backbones", "siglip", "--chunk-images", "3", "--no-progress"])  # fmt: skip
    assert res.exit_code == USER_ERROR_EXIT and "max_failures" in res.output


def test_other_settings_refused(shared_image_set, tmp_path) -> None:
    cfg = _cfg(shared_image_set, tmp_path / "r.zarr", backbones=("siglip",), chunk_images=6)
    run_extract(cfg)
    for change in ({"grid": (7, 7)}, {"seed": 1}, {"layer": 0}, {"chunk_images": 4}):
        with pytest.raises(StoreError, match="different manifest or settings"):
            run_extract(dataclasses.replace(cfg, **change))
    again = run_extract(cfg)  # same settings: nothing left to do
    assert again.computed == 0 and again.skipped == 12
    with pytest.raises(ExtractError, match="unknown backbone"):
        run_extract(dataclasses.replace(cfg, weights=(("nope", "f"),)))


def test_extract_records_where_its_images_are(shared_image_set, tmp_path, monkeypatch) -> None:
    """The store records the manifest and image root as given and resolved; a re-run from
    another copy of the images leaves the complete store (and its fingerprint) as it was."""
    copy = tmp_path / "copy"
    shutil.copytree(shared_image_set.root, copy)
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(shared_image_set, Path("r.zarr"), backbones=("vit",), chunk_images=6)
    run_extract(dataclasses.replace(cfg, manifest=Path("copy/manifest.csv")))
    rec = Store.open("r.zarr").image_source
    assert rec == {"manifest": "copy/manifest.csv", "manifest_abs": str(copy.resolve() / "manifest.csv"),
                   "image_root": "", "image_root_abs": str(copy.resolve())}  # fmt: skip
    fp = Store.open("r.zarr").attrs["fingerprint"]
    again = run_extract(
        dataclasses.replace(
            cfg, manifest=shared_image_set.manifest, image_root=shared_image_set.root
        )
    )
    assert again.computed == 0 and Store.open("r.zarr").attrs["fingerprint"] == fp
    assert Store.open("r.zarr").image_source == rec
    run_extract(dataclasses.replace(cfg, store=Path("s.zarr"), image_root=Path("copy")))
    got = Store.open("s.zarr").image_source
    assert got["image_root"] == "copy" and got["image_root_abs"] == str(copy.resolve())
    assert got["manifest_abs"] == str(shared_image_set.manifest.resolve())


def _cli_args(images, store: Path, chunk: int) -> list[str]:
    return ["extract", "-m", str(images.manifest), "-s", str(store), "--tiny", "--random-init", "--dtype", "fp32",
            "--chunk-images", str(chunk), "--batch-size", "2", "--no-progress"]  # fmt: skip


def test_resume_after_sigkill_gives_the_uninterrupted_store(shared_image_set, tmp_path) -> None:
    ref = _cfg(shared_image_set, tmp_path / "ref.zarr", chunk_images=2, batch_size=2)
    run_extract(ref)
    store = tmp_path / "killed.zarr"
    env = {
        **os.environ,
        "USAE_EXTRACT_TEST_CHUNK_DELAY": "0.4",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "usae.cli", *_cli_args(shared_image_set, store, 2)[:-1]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commits = store / "_usae" / "commits"
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and len(list(commits.glob("c*.json")) if commits.exists() else []) < 2
    ):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in commits.glob("c*.json")}
    assert 2 <= len(before) < 6, "the run must be killed mid-way"
    assert not Store.open(store, require_complete=False).complete
    env.pop("USAE_EXTRACT_TEST_CHUNK_DELAY")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {
        p.name: p.stat().st_mtime_ns for p in commits.glob("c*.json") if p.name in before
    } == before
    assert_same_store(Store.open(store), Store.open(ref.store))


def test_dask_local_cluster_gives_the_in_process_store(shared_image_set, tmp_path) -> None:
    local = _cfg(shared_image_set, tmp_path / "local.zarr", chunk_images=3, batch_size=2)
    run_extract(local)
    dist = dataclasses.replace(local, store=tmp_path / "dask.zarr", workers=2)
    summary = run_extract(dist)
    assert summary.computed == 12
    assert_same_store(Store.open(dist.store), Store.open(local.store))
    from distributed import LocalCluster

    # an existing cluster, reached by its address (threads in this process: cheap to start)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as c:
        remote = dataclasses.replace(
            local, store=tmp_path / "remote.zarr", scheduler=c.scheduler_address
        )
        assert run_extract(remote).computed == 12
    assert_same_store(Store.open(remote.store), Store.open(local.store))


def test_cli_manifest_extract_info(tmp_path, photo_crops) -> None:
    photo_crops(tmp_path / "photos", 5, seed=7)
    runner = CliRunner()
    manifest = tmp_path / "m.parquet"
    res = runner.invoke(app, ["manifest", str(tmp_path / "photos"), "--out", str(manifest)])
    assert res.exit_code == 0, res.output
    store = tmp_path / "cli.zarr"
    args = ["extract", "-m", str(manifest), "--image-root", str(tmp_path / "photos"), "-s", str(store),
            "--tiny", "--random-init", "--backbones", "dinov2,open_clip:ViT-B-16/openai", "--grid", "7x7",
            "--layer", "1", "--chunk-images", "2", "--no-progress"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "computed now" in res.output
    res = runner.invoke(app, ["info", str(store), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert (
        info["complete"]
        and info["n_images"] == 5
        and info["grid"] == [7, 7]
        and info["tokens_per_image"] == 49
    )
    oc = info["backbones"]["ViT-B-16_openai"]
    assert oc["width"] == 64 and oc["prefix_tokens"] == 1 and oc["spec"]["layer"] == 1
    assert oc["spec"]["identity"]["random_init"] and oc["spec"]["compute_dtype"] in ("bf16", "fp32")
    res = runner.invoke(app, ["info", str(store)], terminal_width=200)
    assert res.exit_code == 0 and "complete" in res.output and "dinov2" in res.output
    res = runner.invoke(app, ["info", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 2 and "not a usae store" in res.output
    res = runner.invoke(app, [*args[:-1], "--grid", "0x3"])
    assert res.exit_code == 2 and "--grid" in res.output


def test_cli_options_mirror_config() -> None:
    import inspect

    extract_cmd = next(c.callback for c in app.registered_commands if c.name == "extract")
    params = inspect.signature(extract_cmd).parameters
    fields = {f.name: f for f in dataclasses.fields(ExtractConfig)}
    assert set(params) == set(fields)
    for name, p in params.items():  # CLI defaults are the config's defaults
        default, want = p.default.default, fields[name].default
        if name == "backbones":
            default = tuple(default.split(","))
        elif name in ("grid", "weights"):
            continue  # parsed from text; checked by the CLI test
        if want is not dataclasses.MISSING:
            assert default == want, name


@pytest.fixture(scope="module")
def direct_vit(shared_image_set) -> dict[int, np.ndarray]:
    """Per-image tokens of the tiny vit, one image at a time (the slow, obvious version)."""
    bb = load_backbone(resolve("vit"), random_init=True, tiny=True)
    return {
        i: direct_tokens(bb, shared_image_set.root / p)[0]
        for i, p in enumerate(shared_image_set.paths)
    }


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.integers(1, 5),
    chunk=st.integers(1, 7),
    bad=st.sets(st.integers(0, 11), max_size=3),
)
def test_store_is_independent_of_batching_chunking_and_failures(
    shared_image_set, direct_vit, tmp_path_factory, batch, chunk, bad
) -> None:
    import pandas as pd

    folder = tmp_path_factory.mktemp("prop")
    shutil.copytree(shared_image_set.root / "images", folder / "images")
    paths = list(shared_image_set.paths)
    for i in bad:
        paths[i] = f"broken{i}.png"
        (folder / paths[i]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest = folder / "m.csv"
    pd.DataFrame({"image_id": shared_image_set.image_ids, "path": paths}).to_csv(
        manifest, index=False
    )
    cfg = ExtractConfig(
        manifest=manifest, store=folder / "s.zarr", backbones=("vit",), batch_size=batch,
        chunk_images=chunk, max_failures=1.0, **TINY,
    )  # fmt: skip
    summary = run_extract(cfg)
    st_ = Store.open(cfg.store)
    assert summary.failed == len(bad) and [f["image_id"] for f in st_.failures] == [
        shared_image_set.image_ids[i] for i in sorted(bad)
    ]
    assert list(st_.valid) == [i not in bad for i in range(12)]
    rows = st_.read_rows("vit", 0, st_.n_rows).reshape(12, 196, -1)
    for i in range(12):
        if i in bad:
            assert not rows[i].any()
        else:
            np.testing.assert_allclose(
                rows[i].astype(np.float32), direct_vit[i].astype(np.float32), atol=2e-3, rtol=2e-3
            )
    assert st_.stats("vit")["count"] == (12 - len(bad)) * 196
