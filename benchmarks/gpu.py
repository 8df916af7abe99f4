"""The GPU path in one command: the `cuda` tests, then extraction, training step, loader, cold
reads and analysis measured side by side in this process -> one JSON and the projected hours
for ImageNet-1k (1.28M images x 196 tokens, three backbones) extracted and trained 30 epochs.

    python benchmarks/gpu.py --out $OUT/gpu.json          # on one H100/H200: <= 8 minutes
    python benchmarks/gpu.py --smoke                      # the same code paths on CPU, tiny sizes

It installs nothing. Where the package is not installed (the GPU machine), it makes it
importable from this checkout (a folder of links under /tmp, also on the PYTHONPATH of the
test and torchrun subprocesses); zarr and its three dependencies must be importable there
(carried as wheels: see the lead's notes in docs/contracts.md, "Store").

What is measured (every figure lands in the JSON, `--out`):
- tests: `pytest -m cuda tests/test_cuda.py` with USAE_TEST_DEVICE=cuda (cpu with --smoke);
- extract: `run_extract` of the three default backbones at full size (random init, bf16) on
  demo images vs their bare forward on the same images already on the device (images/s);
- train_step: `train_step` at the paper's sizes (m 6144, k 32, 6272 tokens) in bf16 (tokens/s,
  peak GPU memory);
- loader: rows/s of `ChunkLoader` from a store on local disk (float16 and int8, page cache
  warm and cold; host batches and the device feed), and the step fed by the device feed;
- cold_read: the page-cache-cold read rate of the store's chunk files: each file fsync'ed then
  dropped from the page cache with posix_fadvise(POSIX_FADV_DONTNEED), checked with a
  RWF_NOWAIT probe (`cold_verified`: share of files found uncached), then read whole;
- analysis: `stream_sums` tokens/s and peak GPU memory;
- projection: hours for ImageNet-1k x 30 epochs from the rates above and the store size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGENET_IMAGES, TOKENS_PER_IMAGE, EPOCHS = 1_281_167, 196, 30
PAPER = dict(concepts=6144, k=32, tokens=6272, widths=(384, 768, 768))


def ensure_importable() -> None:
    """Import usae from this checkout when it is not installed (no install: links under /tmp)."""
    try:
        import usae  # noqa: F401

        return
    except ImportError:
        pass
    shim = Path(tempfile.gettempdir()) / "usae-gpu-shim"
    pkg = shim / "usae"
    if not pkg.exists():
        pkg.mkdir(parents=True)
        for f in (REPO / "usae").iterdir():
            (pkg / f.name).symlink_to(f)
        for sub in ("pipeline", "trainer", "analysis"):
            (pkg / sub).symlink_to(REPO / sub)
    sys.path.insert(0, str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    )


ensure_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402


# ---------------------------------------------------------------- helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def timed(fn, dev: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def med(xs) -> float:
    return float(statistics.median(xs))


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- 1. the cuda tests
def run_tests(dev: torch.device, a) -> dict:
    env = {
        **os.environ,
        "USAE_TEST_DEVICE": dev.type,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        str(REPO / "tests" / "test_cuda.py"),
        "--rootdir",
        str(REPO),
        "--junitxml",
        str(a.tmp / "junit.xml"),
    ]
    t0 = time.perf_counter()
    # run from the scratch folder: `python -m` puts the working directory first on sys.path, and
    # the checkout's own usae/ folder (without its stage packages) must not shadow the package
    r = subprocess.run(
        cmd, cwd=a.tmp, env=env, capture_output=True, text=True, timeout=a.test_timeout
    )
    dt = time.perf_counter() - t0
    tail = (r.stdout + r.stderr)[-4000:]
    log(tail[-1500:])
    counts = {}
    with contextlib.suppress(Exception):
        import xml.etree.ElementTree as ET

        ts = ET.parse(a.tmp / "junit.xml").getroot()
        ts = ts if ts.tag == "testsuite" else ts[0]
        counts = {k: int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "device": dev.type,
        "returncode": r.returncode,
        "passed": r.returncode == 0,
        "seconds": dt,
        **counts,
        "output_tail": tail,
    }


# ---------------------------------------------------------------- 2. extraction vs bare forward
def bench_extract(dev: torch.device, a) -> dict:
    from usae.pipeline.backbone import resize_square
    from usae.pipeline.demo_images import build_demo_images
    from usae.pipeline.extract import ExtractConfig, prepare, run_extract
    from usae.pipeline.extract_task import get_backbones
    from usae.pipeline.images import load_image

    manifest = build_demo_images(a.tmp / "images", a.extract_images, seed=0, show_progress=False)
    base = ExtractConfig(
        manifest=manifest,
        store=a.tmp / "warm.zarr",
        backbones=("dinov2", "siglip", "vit"),
        random_init=True,
        tiny=a.smoke,
        dtype="bf16" if dev.type == "cuda" else "auto",
        device=str(dev),
        batch_size=a.extract_batch,
        chunk_images=64,
        progress=False,
        decode_threads=a.decode_threads,
    )
    prep = prepare(base)
    backbones = get_backbones(prep.plan.models)
    dtype = prep.plan.models.dtype
    imgs = [
        torch.from_numpy(load_image(f).copy()).permute(2, 0, 1)[None].float() / 255
        for _, f, _ in prep.items
    ]
    sizes = prep.plan.sizes
    resized = [{s: resize_square(x, s)[0] for s in sizes} for x in imgs]
    batches = [
        {s: torch.stack([r[s] for r in resized[i : i + a.extract_batch]]).to(dev) for s in sizes}
        for i in range(0, len(resized), a.extract_batch)
    ]

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                for bb in backbones:
                    bb(b[bb.spec.img_size], base.grid)

    bare()  # warm-up (kernels, allocator)
    peak_reset(dev)
    bare_s, e2e_s = [], []
    for r in range(a.repeats):
        bare_s += timed(bare, dev, 1)
        cfg = ExtractConfig(**{**base.__dict__, "store": a.tmp / f"extract{r}.zarr"})
        sync(dev)
        t0 = time.perf_counter()
        run_extract(cfg)
        sync(dev)
        e2e_s.append(time.perf_counter() - t0)
        shutil.rmtree(cfg.store)
    n = len(imgs)
    out = {
        "images": n,
        "backbones": list(base.backbones),
        "full_size": not a.smoke,
        "dtype": str(dtype),
        "batch_size": a.extract_batch,
        "decode_threads": a.decode_threads,
        "bare_forward_s": bare_s,
        "extract_s": e2e_s,
        "bare_forward_images_per_s": n / med(bare_s),
        "extract_images_per_s": n / med(e2e_s),
        "peak_gpu_gib": peak_gib(dev),
    }
    out["ratio_extract_over_bare"] = out["extract_images_per_s"] / out["bare_forward_images_per_s"]
    return out


# ---------------------------------------------------------------- 3. the training step
def step_setup(dev: torch.device, a, widths):
    from usae.trainer.config import TrainConfig
    from usae.trainer.model import ModelSpec
    from usae.trainer.state import new_state
    from usae.trainer.train import StepContext

    from usae.runtime import autocast_dtype

    spec = ModelSpec(
        tuple(f"m{j}" for j in range(len(widths))),
        tuple(widths),
        (0.0,) * len(widths),
        (1.0,) * len(widths),
        a.concepts,
        a.k,
    )
    cfg = TrainConfig(lr=3e-4, dtype="bf16", batch_tokens=a.tokens)
    st = new_state(spec, cfg, dev)
    return st, StepContext(cfg, 10**6, 0, 1, autocast_dtype("bf16", dev))


def bench_step(dev: torch.device, a) -> dict:
    from usae.trainer.train import train_step

    widths = PAPER["widths"]
    st, ctx = step_setup(dev, a, widths)
    g = torch.Generator().manual_seed(0)
    lat = torch.relu(torch.randn(a.tokens, 64, generator=g))
    xs = [(lat @ torch.randn(64, d, generator=g) / 8).to(dev) for d in widths]
    for _ in range(3):
        train_step(st, ctx, xs)  # warm-up
    peak_reset(dev)
    times = timed(lambda: [train_step(st, ctx, xs) for _ in range(a.steps)], dev, a.repeats)
    return {
        "tokens": a.tokens,
        "concepts": a.concepts,
        "k": a.k,
        "widths": list(widths),
        "amp": str(ctx.amp),
        "steps": a.steps,
        "times_s": times,
        "tokens_per_s": a.tokens * a.steps / med(times),
        "peak_gpu_gib": peak_gib(dev),
    }


# ---------------------------------------------------------------- 4. store, loader, cold reads
def make_store(path: Path, a, widths) -> Path:
    """A float16 store of `a.store_images` images x 196 tokens (random rows, written chunk by
    chunk: one random block re-scaled per chunk, to keep the writing quick)."""
    from usae.pipeline.store import BackboneLayout, RunningStats, Store

    t = TOKENS_PER_IMAGE
    st = Store.create(
        path,
        [f"i{i}" for i in range(a.store_images)],
        [BackboneLayout(f"m{j}", w) for j, w in enumerate(widths)],
        grid=(14, 14),
        chunk_images=a.chunk_images,
        source="synth",
        fingerprint_of={"bench": a.store_images},
    )
    rng = np.random.default_rng(0)
    block = {
        f"m{j}": rng.standard_normal((a.chunk_images * t, w), dtype=np.float32).astype(np.float16)
        for j, w in enumerate(widths)
    }
    for c in range(st.n_chunks):
        (r0, r1), (i0, i1) = st.chunk_rows(c), st.chunk_images_range(c)
        tok = {k: v[: r1 - r0] * np.float16(1 + c % 7) for k, v in block.items()}
        stats = {
            k: RunningStats.of(v[:64]) for k, v in tok.items()
        }  # a benchmark store: cheap statistics
        st.write_chunk(c, tok, np.ones(i1 - i0, bool), stats=stats)
    st.finalize()
    return path


def chunk_paths(path: Path) -> list[Path]:
    return sorted(
        p
        for p in (path / "backbones").rglob("*")
        if p.is_file() and p.parent.parent.name == "c" and p.parents[2].name == "tokens"
    )


def drop_cache(files: list[Path]) -> float:
    """fsync + POSIX_FADV_DONTNEED each file; the share found uncached afterwards (RWF_NOWAIT probe)."""
    from usae.pipeline.chunk_files import page_cached

    cold = 0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            n = os.fstat(fd).st_size
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            cold += not page_cached(fd, n)
        finally:
            os.close(fd)
    return cold / max(1, len(files))


def cold_read(files: list[Path]) -> dict:
    verified = drop_cache(files)
    buf = bytearray(16 << 20)
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (n := fh.readinto(buf)) > 0:
                total += n
    dt = time.perf_counter() - t0
    return {
        "method": "fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every chunk file, then sequential 16 MiB reads",
        "cold_verified": verified,
        "bytes": total,
        "seconds": dt,
        "bytes_per_s": total / dt,
    }


def loader_rate(
    path: Path, a, widths, *, device=None, drop: bool = False, batches: int | None = None
) -> dict:
    from usae.trainer.loader import ChunkLoader

    keys = [f"m{j}" for j in range(len(widths))]
    files = chunk_paths(path)
    verified = drop_cache(files) if drop else None
    dev = None if device is None else torch.device(device)
    with ChunkLoader(
        path, keys, a.tokens, seed=0, device=dev, pin_memory=dev is not None and dev.type == "cuda"
    ) as ld:
        n = min(batches or ld.batches_per_epoch, ld.batches_per_epoch)
        it = iter(ld)
        b = next(it)  # start-up excluded
        del b
        t0 = time.perf_counter()
        for _ in range(n - 1):
            b = next(it)
            del b
        if dev is not None:
            sync(dev)
        dt = time.perf_counter() - t0
        mode = ld.read_mode
    rows = (n - 1) * a.tokens
    return {
        "rows_per_s": rows / dt,
        "rows": rows,
        "seconds": dt,
        "read_mode": mode,
        "cold": drop,
        "cold_verified": verified,
        "device": None if dev is None else str(dev),
    }


def train_from_loader(path: Path, dev: torch.device, a, widths) -> dict:
    """The step fed by the loader's device feed (pinned, non_blocking, one batch ahead)."""
    from usae.trainer.loader import ChunkLoader
    from usae.trainer.train import train_step

    st, ctx = step_setup(dev, a, widths)
    keys = [f"m{j}" for j in range(len(widths))]
    with ChunkLoader(path, keys, a.tokens, seed=1, device=dev, pin_memory=dev.type == "cuda") as ld:
        it = iter(ld)
        n = min(a.steps * a.repeats, ld.batches_per_epoch - 2)

        def step() -> None:
            b = next(it)
            x = [a_.float() for a_ in b.acts]
            del b
            train_step(st, ctx, x)

        step()
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(dev)
        dt = time.perf_counter() - t0
    return {"steps": n, "tokens_per_s": n * a.tokens / dt, "seconds": dt}


def bench_store(dev: torch.device, a) -> dict:
    from usae.pipeline.store import convert_store

    widths = PAPER["widths"]
    t0 = time.perf_counter()
    f16 = make_store(a.tmp / "bench16.zarr", a, widths)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q8 = convert_store(f16, a.tmp / "bench8.zarr").path
    convert_s = time.perf_counter() - t0
    out: dict = {
        "images": a.store_images,
        "rows": a.store_images * TOKENS_PER_IMAGE,
        "widths": list(widths),
        "write_s": write_s,
        "convert_int8_s": convert_s,
        "disk": str(a.tmp),
    }
    for name, path in (("float16", f16), ("int8", q8)):
        files = chunk_paths(path)
        nbytes = sum(f.stat().st_size for f in files)
        r = {"bytes": nbytes, "row_bytes": nbytes / (a.store_images * TOKENS_PER_IMAGE)}
        r["cold_read"] = cold_read(files)
        r["loader_warm_host"] = loader_rate(path, a, widths)
        r["loader_warm_device"] = loader_rate(path, a, widths, device=dev)
        r["loader_cold_device"] = loader_rate(path, a, widths, device=dev, drop=True)
        r["train_from_loader"] = train_from_loader(path, dev, a, widths)
        out[name] = r
        log(
            f"  {name}: {nbytes / 2**30:.2f} GiB, cold read {r['cold_read']['bytes_per_s'] / 2**30:.2f} GiB/s, "
            f"loader warm {r['loader_warm_device']['rows_per_s']:.0f} rows/s, cold {r['loader_cold_device']['rows_per_s']:.0f}, "
            f"step from loader {r['train_from_loader']['tokens_per_s']:.0f} tokens/s"
        )
    shutil.rmtree(f16, ignore_errors=True)
    shutil.rmtree(q8, ignore_errors=True)
    return out


# ---------------------------------------------------------------- 5. analysis
def bench_analysis(dev: torch.device, a) -> dict:
    from usae.analysis import metrics as mx
    from usae.pipeline.store import Store
    from usae.trainer.evaluate import prepare_model
    from usae.trainer.model import USAE, ModelSpec

    widths = PAPER["widths"]
    sa = argparse.Namespace(**{**vars(a), "store_images": a.analysis_images})
    path = make_store(a.tmp / "analysis.zarr", sa, widths)
    st = Store.open(path)
    keys = list(st.backbones)
    spec = ModelSpec(tuple(keys), tuple(widths), (0.0,) * 3, (1.0,) * 3, a.concepts, a.k)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = prepare_model(USAE(spec), dtype, dev)
    mask = st.valid
    mx.stream_sums(model, st, keys, mask, batch_tokens=a.tokens, device=dev, dtype=dtype)  # warm-up
    peak_reset(dev)
    times = timed(
        lambda: mx.stream_sums(
            model, st, keys, mask, batch_tokens=a.tokens, device=dev, dtype=dtype
        ),
        dev,
        a.repeats,
    )
    tokens = int(mask.sum()) * TOKENS_PER_IMAGE
    shutil.rmtree(path, ignore_errors=True)
    return {
        "tokens": tokens,
        "dtype": str(dtype),
        "batch_tokens": a.tokens,
        "times_s": times,
        "tokens_per_s": tokens / med(times),
        "peak_gpu_gib": peak_gib(dev),
    }


# ---------------------------------------------------------------- 6. projection
def project(res: dict) -> dict:
    tokens = IMAGENET_IMAGES * TOKENS_PER_IMAGE
    ex = res.get("extract", {}).get("extract_images_per_s")
    step = res.get("train_step", {}).get("tokens_per_s")
    out = {
        "images": IMAGENET_IMAGES,
        "tokens": tokens,
        "epochs": EPOCHS,
        "extract_hours": IMAGENET_IMAGES / ex / 3600 if ex else None,
    }
    for name in ("float16", "int8"):
        s = res.get("store", {}).get(name)
        if not s or not step:
            continue
        store_bytes = tokens * s["row_bytes"]
        disk_rows = s["cold_read"]["bytes_per_s"] / s["row_bytes"]
        rates = {
            "step": step,
            "loader_cold": s["loader_cold_device"]["rows_per_s"],
            "loader_warm": s["loader_warm_device"]["rows_per_s"],
            "disk_cold": disk_rows,
            "step_from_loader": s["train_from_loader"]["tokens_per_s"],
        }
        # the store is larger than the page cache at ImageNet scale: every epoch reads it cold
        bound = min(rates["step"], rates["loader_cold"], rates["disk_cold"])
        limit = min(("step", "loader_cold", "disk_cold"), key=lambda k: rates[k])
        train_h = EPOCHS * tokens / bound / 3600
        out[name] = {
            "store_bytes": store_bytes,
            "store_tib": store_bytes / 2**40,
            "reads_30_epochs_tib": EPOCHS * store_bytes / 2**40,
            "rates_tokens_per_s": rates,
            "bound_tokens_per_s": bound,
            "limited_by": limit,
            "train_hours": train_h,
            "total_hours": train_h + (out["extract_hours"] or 0.0),
        }
    return out


def print_summary(res: dict) -> None:
    log(
        "\n==== GPU path summary "
        + ("(SMOKE: CPU, tiny sizes; not figures)" if res["smoke"] else "")
    )
    t = res.get("tests")
    if t:
        log(
            f"tests -m cuda on {t['device']}: {'passed' if t['passed'] else 'FAILED'} "
            f"({t.get('tests', '?')} tests, {t.get('failures', '?')} failures, {t.get('errors', '?')} errors, {t['seconds']:.0f} s)"
        )
    e = res.get("extract")
    if e:
        log(
            f"extract {e['images']} images x {len(e['backbones'])} backbones: {e['extract_images_per_s']:.1f} images/s, "
            f"bare forward {e['bare_forward_images_per_s']:.1f} (ratio {e['ratio_extract_over_bare']:.2f})"
        )
    s = res.get("train_step")
    if s:
        log(
            f"train step m={s['concepts']} k={s['k']} {s['tokens']} tokens ({s['amp']}): {s['tokens_per_s']:.0f} tokens/s, "
            f"peak {s['peak_gpu_gib']} GiB"
        )
    an = res.get("analysis")
    if an:
        log(f"analysis: {an['tokens_per_s']:.0f} tokens/s, peak {an['peak_gpu_gib']} GiB")
    p = res.get("projection", {})
    if p.get("extract_hours") is not None:
        log(
            f"ImageNet-1k ({p['images']} images x {TOKENS_PER_IMAGE} tokens, 3 backbones): extraction {p['extract_hours']:.2f} h"
        )
    for name in ("float16", "int8"):
        q = p.get(name)
        if q:
            r = q["rates_tokens_per_s"]
            log(
                f"  {name:7} store {q['store_tib']:.2f} TiB, {EPOCHS} epochs read {q['reads_30_epochs_tib']:.1f} TiB; "
                f"step {r['step']:.0f}, loader cold {r['loader_cold']:.0f}, disk cold {r['disk_cold']:.0f}, "
                f"step-from-loader (warm) {r['step_from_loader']:.0f} tokens/s -> training {q['train_hours']:.2f} h "
                f"(limited by {q['limited_by']}), total {q['total_hours']:.2f} h"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, tiny sizes: the same code paths in < 2 minutes"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: $OUT/gpu.json or bench_out/gpu.json)",
    )
    ap.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="scratch folder on local disk (default: a new temp dir)",
    )
    ap.add_argument(
        "--skip", default="", help="comma list of parts to skip: tests,extract,step,store,analysis"
    )
    ap.add_argument("--test-timeout", type=int, default=300)
    a = ap.parse_args()
    full = dict(
        extract_images=512,
        extract_batch=128,
        decode_threads=8,
        repeats=3,
        steps=20,
        store_images=6400,
        chunk_images=64,
        analysis_images=1024,
        **{k: v for k, v in PAPER.items() if k != "widths"},
    )
    smoke = dict(
        extract_images=4,
        extract_batch=4,
        decode_threads=2,
        repeats=2,
        steps=2,
        store_images=48,
        chunk_images=8,
        analysis_images=8,
        concepts=256,
        k=8,
        tokens=392,
    )
    for k, v in (smoke if a.smoke else full).items():
        setattr(a, k, v)
    if a.out is None:
        a.out = (
            Path(os.environ["OUT"]) / "gpu.json"
            if os.environ.get("OUT")
            else REPO / "bench_out" / "gpu.json"
        )
    if a.smoke:
        dev = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device (use --smoke on a machine without a GPU)")
        dev = torch.device("cuda")
    skip = set(filter(None, a.skip.split(",")))
    own_tmp = a.tmp is None
    a.tmp = Path(tempfile.mkdtemp(prefix="usae-gpu-")) if own_tmp else a.tmp
    a.tmp.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "smoke": a.smoke,
        "device": str(dev),
        "args": {k: str(v) for k, v in vars(a).items()},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "seconds": {},
    }
    t_all = time.perf_counter()
    parts = [
        ("tests", lambda: run_tests(dev, a)),
        ("extract", lambda: bench_extract(dev, a)),
        ("train_step", lambda: bench_step(dev, a)),
        ("store", lambda: bench_store(dev, a)),
        ("analysis", lambda: bench_analysis(dev, a)),
    ]
    short = {"train_step": "step"}
    try:
        for name, fn in parts:
            if short.get(name, name) in skip:
                continue
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                res[name] = fn()
            except Exception as e:  # noqa: BLE001 - one part failing must not lose the others' figures
                import traceback

                traceback.print_exc()
                res[name] = {"error": f"{type(e).__name__}: {e}"}
            res["seconds"][name] = time.perf_counter() - t0
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(
                json.dumps(res, indent=1, default=str)
            )  # what is done so far survives a timeout
        res["projection"] = project(
            {k: v for k, v in res.items() if isinstance(v, dict) and "error" not in v}
        )
        res["seconds"]["total"] = time.perf_counter() - t_all
        a.out.write_text(json.dumps(res, indent=1, default=str))
        print_summary(res)
        log(f"written {a.out} ({res['seconds']['total']:.0f} s)")
    finally:
        if own_tmp:
            shutil.rmtree(a.tmp, ignore_errors=True)
    failed = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    if failed or not res.get("tests", {"passed": True})["passed"]:
        sys.exit(
            f"error: failed parts: {failed + ([] if res.get('tests', {'passed': True})['passed'] else ['tests'])}"
        )


if __name__ == "__main__":
    main()
