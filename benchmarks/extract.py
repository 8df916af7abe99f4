"""Benchmark: end-to-end `usae extract` throughput vs the bare forward of the same backbones.

Both sides run the same full-size backbones (random init: no weights needed), same dtype,
same batch size, in this process, on the same images. The bare forward gets the images
already decoded and resized (tensors in memory) and does nothing but the forward passes;
`run_extract` decodes the files, resizes, runs the backbones, converts to float16, computes
statistics and writes the store. The two are timed alternately, `--repeats` times each, and
the ratio of median throughputs is reported (target >= 0.9). Model loading is excluded
(both reuse the process's loaded backbones). Both sides use the same number of torch
threads (`--threads`, default 1: on a small shared machine, OpenMP teams of 2+ threads that
get preempted make timings swing by 2-3x, which would swamp the comparison).

    python benchmarks/extract.py --images 64 --repeats 3 --out benchmarks/extract.json

With ``--layers 3,6,9,11`` it measures instead what several depths cost: end-to-end extraction
of the first backbone at those 4 layers (one forward pass, 4 store groups) against the same
backbone at its deepest one of them alone (each after an untimed run that loads the model;
target: <= 1.1x).

    python benchmarks/extract.py --backbones dinov2 --layers 3,6,9,11 --out benchmarks/extract_layers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from usae.pipeline.backbone import resize_square
from usae.pipeline.extract import ExtractConfig, prepare, run_extract
from usae.pipeline.extract_task import get_backbones
from usae.pipeline.images import load_image


def make_images(folder: Path, n: int) -> Path:
    """n demo images (JPEG/PNG crops of bundled photos, 160-320 px) + their manifest."""
    from usae.pipeline.demo_images import build_demo_images

    return build_demo_images(folder, n, seed=0, show_progress=False)


def bare_forward(
    backbones, batches_b3hw: list[dict[int, torch.Tensor]], grid
) -> tuple[float, float]:
    """(wall, process CPU) seconds of the forward passes alone over preprocessed batches."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in batches_b3hw:
            for bb in backbones:
                bb.forward_layers(batch[bb.spec.img_size], grid)
    return time.perf_counter() - t0, time.process_time() - c0


def timed_extract(base: ExtractConfig, folder: Path, backbones: tuple[str, ...], tag: str) -> float:
    """Wall seconds of one end-to-end extraction of `backbones` into a fresh store (then removed)."""
    cfg = ExtractConfig(
        **{**base.__dict__, "backbones": backbones, "store": folder / f"{tag}.zarr"}
    )
    t0 = time.perf_counter()
    run_extract(cfg)
    wall = time.perf_counter() - t0
    shutil.rmtree(cfg.store)
    return wall


def layers_cost(base: ExtractConfig, folder: Path, layers: str, repeats: int) -> dict:
    """Extraction of 4 (say) layers of one backbone vs its deepest one of them alone."""
    name = base.backbones[0]
    many, one = (f"{name}@{layers}",), (f"{name}@{max(int(x) for x in layers.split(','))}",)
    times: dict[tuple[str, ...], list[float]] = {one: [], many: []}
    for names in (one, many):  # one configuration at a time: the process caches one set of models
        timed_extract(base, folder, names, "warm")  # loads the model: not timed
        times[names] = [timed_extract(base, folder, names, f"run{r}") for r in range(repeats)]
    one_s, many_s = times[one], times[many]
    ratio = statistics.median(many_s) / statistics.median(one_s)
    print(
        f"{name}: 1 layer {statistics.median(one_s):.2f} s, layers {layers} {statistics.median(many_s):.2f} s"
    )
    print(f"ratio {len(layers.split(','))} layers / 1 layer = {ratio:.3f} (target <= 1.1)")
    return {"backbone": name, "layers": layers, "one_layer_s": one_s, "layers_s": many_s,
            "ratio_layers_over_one": ratio, "target_ratio": 1.1}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-images", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads on both sides (0: torch's default)"
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--backbones", default="dinov2,siglip,vit")
    ap.add_argument(
        "--layers",
        default="",
        help="e.g. 3,6,9,11: cost of these layers of the first backbone vs one",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/extract.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="usae-bench-extract-"))
    try:
        manifest = make_images(tmp, args.images)
        base = ExtractConfig(
            manifest=manifest, store=tmp / "warm.zarr", backbones=tuple(args.backbones.split(",")),
            random_init=True, dtype=args.dtype, batch_size=args.batch_size, progress=False,
            chunk_images=args.chunk_images,
        )  # fmt: skip
        if args.layers:
            result = {"images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
                      "torch_threads": torch.get_num_threads(),
                      **layers_cost(base, tmp, args.layers, args.repeats)}  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            return
        prep = prepare(base)  # loads the backbones once (cached for every run below)
        backbones = get_backbones(prep.plan.models)
        sizes = prep.plan.sizes
        images = [
            torch.from_numpy(load_image(f).copy()).permute(2, 0, 1)[None].float() / 255
            for _, f, _ in prep.items
        ]
        resized = [{s: resize_square(x, s)[0] for s in sizes} for x in images]
        batches = [
            {s: torch.stack([r[s] for r in resized[i : i + args.batch_size]]) for s in sizes}
            for i in range(0, len(resized), args.batch_size)
        ]
        bare_forward(backbones, batches[:1], base.grid)  # warm-up
        bare_s, e2e_s, bare_cpu, e2e_cpu = [], [], [], []
        for r in range(args.repeats):
            wall, cpu = bare_forward(backbones, batches, base.grid)
            bare_s.append(wall)
            bare_cpu.append(cpu)
            cfg = ExtractConfig(**{**base.__dict__, "store": tmp / f"run{r}.zarr"})
            t0, c0 = time.perf_counter(), time.process_time()
            run_extract(cfg)
            e2e_s.append(time.perf_counter() - t0)
            e2e_cpu.append(time.process_time() - c0)
            shutil.rmtree(cfg.store)
        n = len(images)
        bare_ips, e2e_ips = n / statistics.median(bare_s), n / statistics.median(e2e_s)
        result = {
            "images": n,
            "backbones": list(base.backbones),
            "dtype": prep.plan.models.dtype,
            "batch_size": args.batch_size,
            "chunk_images": base.chunk_images,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "bare_forward_s": bare_s,
            "extract_s": e2e_s,
            "bare_forward_images_per_s": bare_ips,
            "extract_images_per_s": e2e_ips,
            "ratio_extract_over_bare": e2e_ips / bare_ips,
            "bare_forward_cpu_s": bare_cpu,
            "extract_cpu_s": e2e_cpu,
            "cpu_ratio_bare_over_extract": statistics.median(bare_cpu) / statistics.median(e2e_cpu),
            "target_ratio": 0.9,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'what':<28}{'median s':>10}{'images/s':>10}")
    print(f"{'bare forward':<28}{statistics.median(bare_s):>10.2f}{bare_ips:>10.2f}")
    print(f"{'usae extract (end to end)':<28}{statistics.median(e2e_s):>10.2f}{e2e_ips:>10.2f}")
    print(
        f"ratio extract / bare = {result['ratio_extract_over_bare']:.3f} (target >= 0.9), dtype {result['dtype']}"
    )
    print(
        f"CPU-time ratio bare / extract = {result['cpu_ratio_bare_over_extract']:.3f} (pipeline's extra work)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
