"""Analysis throughput and memory -> table on stdout + JSON (`python benchmarks/analyze.py`).

1. Throughput ratio: tokens/s of the full metrics pass (``stream_sums``: encode, decode into
   every backbone, float64 error sums, fires, co-fires, energies, top images) divided by
   tokens/s of a bare encode-only pass (read the same chunks, standardise, encode) of the
   same model on the same store. The two are interleaved, median of --repeats runs each.
   Target: >= 0.7.
2. Peak memory: the metrics pass runs in a fresh subprocess on a store of N tokens and on one
   of 8N tokens; peak RSS must grow < 15% (codes are never held across the dataset).

Absolute times drift on shared machines; only the ratios are meant to be compared.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from usae.analysis import metrics as mx
from usae.pipeline.store import BackboneLayout, Store
from usae.trainer import evaluate as ev
from usae.trainer.model import USAE, ModelSpec

from usae.runtime import torch_dtype


@dataclass(frozen=True)
class BenchConfig:
    """Settings of the analysis benchmark."""

    tokens: int = 32768
    """Tokens in the throughput store."""
    widths: tuple[int, ...] = (384, 768, 768)
    """Backbone widths (the paper's DINOv2-S, SigLIP-B, ViT-B)."""
    concepts: int = 4096
    """Concepts m."""
    k: int = 32
    """TopK."""
    batch_tokens: int = 4096
    """Tokens per batch."""
    dtype: str = "bf16"
    """Encoder dtype (the CPU has AMX: bf16 is the fast path)."""
    repeats: int = 3
    """Timed runs of each path (median reported)."""
    rss_tokens: int = 16384
    """Tokens of the small memory store (the large one has 8x)."""
    threads: int = 1
    """torch threads (1 by default: on a shared, oversubscribed CPU, multi-threaded small ops
    stall on descheduled threads and the ratio measures the contention, not the code)."""
    out: str = "bench_out/analyze.json"
    """JSON results file."""


def make_store(path: Path, tokens: int, widths, seed: int = 0, tpi: int = 16) -> Store:
    n_img = tokens // tpi
    st = Store.create(
        path,
        [f"i{i}" for i in range(n_img)],
        [BackboneLayout(f"b{i}", w) for i, w in enumerate(widths)],
        grid=(4, 4),
        chunk_images=256,
        source="synth",
        fingerprint_of={"bench": seed, "n": n_img},
    )
    rng = np.random.default_rng(seed)
    for ci in range(st.n_chunks):
        r0, r1 = st.chunk_rows(ci)
        a, b = st.chunk_images_range(ci)
        st.write_chunk(
            ci,
            {
                f"b{i}": rng.standard_normal((r1 - r0, w), dtype=np.float32).astype(np.float16)
                for i, w in enumerate(widths)
            },
            np.ones(b - a, bool),
        )
    st.finalize()
    return Store.open(path)


def make_model(widths, concepts: int, k: int) -> USAE:
    torch.manual_seed(0)
    return USAE(
        ModelSpec(
            tuple(f"b{i}" for i in range(len(widths))),
            tuple(widths),
            (0.0,) * len(widths),
            (1.0,) * len(widths),
            concepts=concepts,
            k=k,
        )
    ).eval()


@torch.no_grad()
def encode_only(model: USAE, store: Store, batch_tokens: int, dtype: torch.dtype) -> int:
    """The bare pass: same chunk reads and encoder, nothing accumulated."""
    n = 0
    keys = list(model.spec.backbones)
    for _, acts, _, _ in ev.iter_batches(store, keys, np.ones(store.n_images, bool), batch_tokens):
        ev.encode_batch(model, acts, dtype)
        n += acts[0].shape[0]
    return n


def metrics_pass(model: USAE, store: Store, batch_tokens: int, dtype: torch.dtype) -> int:
    s = mx.stream_sums(
        model,
        store,
        list(model.spec.backbones),
        np.ones(store.n_images, bool),
        batch_tokens=batch_tokens,
        dtype=dtype,
    )
    mx.concept_table(s), ev.reconstruction(s)
    return s.n_tokens


def throughput(cfg: BenchConfig, tmp: Path) -> dict:
    store = make_store(tmp / "tp.zarr", cfg.tokens, cfg.widths)
    dtype = torch_dtype(cfg.dtype)
    model = ev.prepare_model(make_model(cfg.widths, cfg.concepts, cfg.k), dtype, "cpu")
    encode_only(model, store, cfg.batch_tokens, dtype)  # warm-up: page cache, kernels
    times: dict[str, list[float]] = {"encode_only": [], "metrics": []}
    for _ in range(cfg.repeats):
        for name, fn in (("encode_only", encode_only), ("metrics", metrics_pass)):
            t0 = time.perf_counter()
            n = fn(model, store, cfg.batch_tokens, dtype)
            times[name].append(time.perf_counter() - t0)
            assert n == store.n_rows
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tokens": store.n_rows,
        "seconds": times,
        "median_s": med,
        "tokens_per_s": {k: store.n_rows / v for k, v in med.items()},
        "ratio_metrics_over_encode": med["encode_only"] / med["metrics"],
    }


def rss_child(store_path: str, cfg_json: str) -> None:
    """Subprocess entry: one metrics pass, print peak RSS (MiB)."""
    cfg = BenchConfig(**{**json.loads(cfg_json), "widths": tuple(json.loads(cfg_json)["widths"])})
    torch.set_num_threads(cfg.threads)
    store = Store.open(store_path)
    dtype = torch_dtype(cfg.dtype)
    metrics_pass(make_model(cfg.widths, cfg.concepts, cfg.k), store, cfg.batch_tokens, dtype)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(cfg: BenchConfig, tmp: Path) -> dict:
    out = {}
    for name, tokens in (("1x", cfg.rss_tokens), ("8x", 8 * cfg.rss_tokens)):
        path = tmp / f"rss_{name}.zarr"
        make_store(path, tokens, cfg.widths, seed=1)
        r = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(path), json.dumps(asdict(cfg))],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = {"tokens": tokens, **json.loads(r.stdout.strip().splitlines()[-1])}
        shutil.rmtree(path)
    out["growth"] = out["8x"]["peak_rss_mib"] / out["1x"]["peak_rss_mib"] - 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchConfig()
    for f in ("tokens", "concepts", "k", "batch_tokens", "repeats", "rss_tokens", "threads"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    ap.add_argument("--dtype", default=d.dtype, choices=mx.ANALYSIS_DTYPES)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        return rss_child(*a.rss_child)
    cfg = BenchConfig(**{k: v for k, v in vars(a).items() if k != "rss_child"})
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="usae_bench_") as tmp:
        tp = throughput(cfg, Path(tmp))
        mem = memory(cfg, Path(tmp))
    res = {"config": asdict(cfg), "throughput": tp, "memory": mem, "torch": torch.__version__}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(res, indent=1))
    print(f"{'measure':<42}{'value':>12}{'target':>10}")
    print(
        f"{'encode-only tokens/s (median)':<42}{tp['tokens_per_s']['encode_only']:>12.0f}{'':>10}"
    )
    print(f"{'metrics tokens/s (median)':<42}{tp['tokens_per_s']['metrics']:>12.0f}{'':>10}")
    print(
        f"{'throughput ratio metrics / encode-only':<42}{tp['ratio_metrics_over_encode']:>12.3f}{'>= 0.7':>10}"
    )
    print(f"{'peak RSS 1x MiB':<42}{mem['1x']['peak_rss_mib']:>12.0f}{'':>10}")
    print(f"{'peak RSS 8x MiB':<42}{mem['8x']['peak_rss_mib']:>12.0f}{'':>10}")
    print(f"{'peak RSS growth 1x -> 8x':<42}{mem['growth']:>12.3f}{'< 0.15':>10}")
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
