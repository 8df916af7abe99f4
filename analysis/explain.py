"""A trained run + new images -> which concepts fire on each image, in each backbone, and where
(`usae explain`).

The run's backbones are rebuilt from its store's record (`usae.analysis.backbones`: the same
registry spec, layer, weights sha256 and compute dtype), the images go through extraction's own
decode and forward path (`usae.pipeline.extract_task.compute_images`: the same resize, batching,
grid resampling and float16 tokens as a store holds), and each image's tokens are encoded by the
run exactly as the analysis encodes a store's (`usae.trainer.evaluate.encode_batch`, one image
at a time). So an image that is also in the training store gets the codes its stored tokens get.

Output (OUT/):
- ``explain.json``: the run, store, backbones, member-set source, the images explained and
  those skipped (``failures``: image_id, path, reason), timings, and per image its top
  concepts per backbone (concept, max and mean code over the tokens, tokens fired, the
  concept's member set, the backbones it fires in on this image).
- ``codes.parquet``: every non-zero TopK code, one row per (image_id, backbone, token, concept,
  value); ``token`` = row * grid_w + column on the store grid.
- ``top.parquet``: the per-image top concepts of explain.json as a table.
- ``thumbs/<n>/``: image n's photo (``photo.jpg``, as the backbones saw it) and, for each
  concept in one of its top lists, each backbone's token map over it (``<k>_<key>.jpg``).
- ``index.html``: a card per image: the photo, then per backbone its top concepts, each with
  one token map per backbone, its lives-in badge and where it fires here; linked to the
  concept's page of ``--report`` when it has one.
Bad or missing images are named in explain.json, index.html and on stderr, and skipped.
"""

from __future__ import annotations

import html
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from usae.analysis.backbones import BackboneError, load_targets, open_run
from usae.trainer.evaluate import encode_batch, prepare_model
from usae.trainer.model import USAE

from usae.errors import UsaeError
from usae.runtime import (
    atomic_path,
    atomic_write,
    atomic_write_json,
    check_device_name,
    config_json,
    progress_bar,
    resolve_device,
)

SCHEMA_VERSION = 1


class ExplainError(UsaeError, RuntimeError):
    """A user-facing problem with the run, its store, the images or the options."""


@dataclass(frozen=True)
class ExplainConfig:
    """Apply a trained run to new images: each image's top concepts per backbone, and where they fire."""

    run: Path
    """Run directory written by `usae train`."""
    images: Path
    """A folder of images, a manifest (.parquet or .csv with image_id and path), or one image file."""
    out: Path
    """Output directory (explain.json, codes.parquet, top.parquet, thumbs/, index.html)."""
    image_root: Path | None = None
    """Folder a manifest's paths are relative to (default: the manifest's folder)."""
    store: Path | None = None
    """Store whose record gives the backbones, weights, layers and grid (default: the run's store)."""
    report: Path | None = None
    """Report of `usae analyze` for this run: member sets from its concepts.parquet, links to its concept pages (default: member sets from the run's decoder gains)."""
    weights: tuple[str, ...] = ()
    """KEY=FILE weights for backbones whose weights came from a file."""
    top: int = 5
    """Top concepts per image and backbone (by the max of the code over the image's tokens)."""
    batch_size: int = 0
    """Images per forward pass (0: the batch size the store was extracted with)."""
    chunk_images: int = 64
    """Images decoded ahead and computed together (decoding overlaps the forward passes)."""
    decode_threads: int = 2
    """Threads that decode and resize images while the backbones run."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Backbone compute dtype: auto (the dtype the store was extracted with), fp32, bf16 or fp16."""
    thumbs: bool = True
    """Write the photos and token maps and the index.html that shows them."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ExplainError(f"--top must be >= 1, got {self.top}")
        if self.batch_size < 0 or self.chunk_images < 1 or self.decode_threads < 1:
            raise ExplainError(
                "--batch-size must be >= 0, --chunk-images and --decode-threads >= 1"
            )
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ExplainError(f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        check_device_name(self.device)


class ExplainResult(NamedTuple):
    """What `run_explain` did."""

    out: Path
    n_images: int  # images listed
    explained: int  # images encoded
    failures: list[dict]  # {image_id, path, reason} of the images skipped
    seconds: float  # wall time of the whole command
    index: Path | None  # index.html (None with thumbs off)


# ---------------------------------------------------------------- inputs
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_items(images: Path, image_root: Path | None) -> list[tuple[str, str, str]]:
    """(image_id, file to read, path as listed) of every image of a folder, manifest or file."""
    from usae.pipeline.manifest import ManifestError, build_manifest, manifest_items, read_manifest

    images = Path(images)
    try:
        if images.is_dir():
            df = build_manifest(images, hash_files=False, show_progress=False)
        elif images.suffix.lower() in IMAGE_SUFFIXES:
            return [(images.stem, os.fspath(images), os.fspath(images))]
        elif images.exists():
            df = read_manifest(images, image_root)
        else:
            raise ExplainError(f"--images {images}: no such folder, manifest or image file")
    except ManifestError as e:
        raise ExplainError(f"--images {images}: {e}") from None
    if len(df) == 0:
        raise ExplainError(f"--images {images}: no images")
    return manifest_items(df)


def member_sets(model: USAE, keys: Sequence[str], report: Path | None) -> tuple[list[str], str]:
    """Each concept's member set as text ("all", "a+b", "a", "") and where it came from: the
    report's concepts.parquet, else the gain rule on the run's decoder gains alone (gain >=
    GAIN_RATIO x the concept's largest; liveness unknown), else none (a model without gains)."""
    from usae.analysis.membership import GAIN_RATIO, member_labels, member_matrix

    m = model.spec.concepts
    if report is not None:
        path = Path(report) / "concepts.parquet"
        if not path.is_file():
            raise ExplainError(f"--report {report}: no concepts.parquet (not a usae report)")
        df = pd.read_parquet(path, columns=["concept", "members"])
        if len(df) != m or list(df["concept"]) != list(range(m)):
            raise ExplainError(
                f"--report {report} lists {len(df)} concepts, the run has {m}: not this run's report"
            )
        return [str(v) if v is not None else "" for v in df["members"]], f"report {report}"
    if not model.spec.gains:
        return [""] * m, "none (the run learns no gains; pass --report for member sets)"
    with torch.no_grad():
        g_mk = torch.stack([model.gain(j).float().cpu() for j in range(model.n_models)]).numpy()
    every = np.ones_like(g_mk)  # no data: every concept counted as firing in every backbone
    members = member_matrix(every, every, g_mk)
    return member_labels(members, keys), f"decoder gains (>= {GAIN_RATIO:g} x largest)"


# ---------------------------------------------------------------- one image
class ImageCodes(NamedTuple):
    """One image's codes in every backbone."""

    z_Mtm: np.ndarray
    """(M, T, m) float32 dense codes (zeros where a concept is not in a token's TopK)."""
    indices: list[np.ndarray]
    """Per backbone (T, k) concept of each TopK slot."""
    values: list[np.ndarray]
    """Per backbone (T, k) its code."""


@torch.no_grad()
def encode_image(model: USAE, tokens: Sequence[np.ndarray], dtype: torch.dtype) -> ImageCodes:
    """One image's float16 tokens (T, d_i) per backbone -> its codes (``encode_batch`` as the
    analysis applies it to a store's rows; ``model`` prepared with ``prepare_model``)."""
    dev = model.mu.device
    acts = [torch.from_numpy(np.ascontiguousarray(t)).to(dev) for t in tokens]
    _, codes = encode_batch(model, acts, dtype)
    z = np.stack([model.dense_codes(c).float().cpu().numpy() for c in codes])
    return ImageCodes(
        z,
        [c.indices_bk.cpu().numpy() for c in codes],
        [c.values_bk.float().cpu().numpy() for c in codes],
    )


def top_concepts(
    z_Mtm: np.ndarray, keys: Sequence[str], members: Sequence[str], top: int
) -> dict[str, list[dict]]:
    """Per backbone, the ``top`` concepts of one image by the max of their code over its tokens
    (ties: the lower concept id), with mean, tokens fired, member set and where they fire."""
    max_Mm = z_Mtm.max(1)
    mean_Mm = z_Mtm.mean(1)
    fired_Mm = (z_Mtm > 0).sum(1)
    out = {}
    for i, key in enumerate(keys):
        order = np.lexsort((np.arange(max_Mm.shape[1]), -max_Mm[i]))
        ks = [int(k) for k in order[:top] if max_Mm[i, k] > 0]
        out[key] = [
            {
                "concept": k,
                "max": float(max_Mm[i, k]),
                "mean": float(mean_Mm[i, k]),
                "tokens": int(fired_Mm[i, k]),
                "members": members[k],
                "fires_in": [kk for j, kk in enumerate(keys) if max_Mm[j, k] > 0],
            }
            for k in ks
        ]
    return out


def thumb_dir(n: int) -> str:
    """Folder (relative to OUT) of image n's photo and token maps."""
    return f"thumbs/{n}"


def token_map_file(n: int, k: int, key: str) -> str:
    """Path (relative to OUT) of backbone ``key``'s token map of concept k over image n."""
    from usae.analysis.render import file_key

    return f"{thumb_dir(n)}/{k}_{file_key(key)}.jpg"


def write_image_thumbs(
    out: Path, n: int, pic_hw3: np.ndarray, z_Mtm: np.ndarray, grid, keys, concepts
) -> None:
    """Image n's photo and, for each concept, its token map in every backbone (one colour
    scale per concept and image, so the backbones compare fairly)."""
    from usae.analysis.figures import write_thumbs

    gh, gw = grid
    for c, k in enumerate(concepts):
        maps = z_Mtm[:, :, k].reshape(len(keys), gh, gw)
        write_thumbs(
            out, pic_hw3, maps, keys, photo=f"{thumb_dir(n)}/photo.jpg" if c == 0 else None,
            heat={key: token_map_file(n, k, key) for key in keys},
        )  # fmt: skip


def _picture(decoded_images: dict[int, torch.Tensor]) -> np.ndarray:
    """The image as the largest backbone input saw it, RGB uint8 (s, s, 3)."""
    x = decoded_images[max(decoded_images)]
    return (x.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- codes files
class _CodesWriter:
    """codes.parquet, written a chunk of images at a time (memory of one chunk)."""

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = pa.schema([
            ("image_id", pa.string()), ("backbone", pa.string()), ("token", pa.int32()),
            ("concept", pa.int32()), ("value", pa.float32()),
        ])  # fmt: skip
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.parts: list[dict] = []

    def add(self, image_id: str, keys: Sequence[str], codes: ImageCodes) -> None:
        for key, idx_tk, val_tk in zip(keys, codes.indices, codes.values, strict=True):
            keep = val_tk > 0
            tok = np.broadcast_to(np.arange(idx_tk.shape[0])[:, None], idx_tk.shape)[keep]
            self.parts.append({
                "image_id": np.full(len(tok), image_id, dtype=object), "backbone":
                np.full(len(tok), key, dtype=object), "token": tok.astype(np.int32),
                "concept": idx_tk[keep].astype(np.int32), "value": val_tk[keep].astype(np.float32),
            })  # fmt: skip

    def flush(self) -> None:
        import pyarrow as pa

        if self.parts:
            cols = {c: np.concatenate([p[c] for p in self.parts]) for c in self.schema.names}
            self.writer.write_table(pa.table(cols, schema=self.schema))
            self.parts = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)


# ---------------------------------------------------------------- run
def run_explain(cfg: ExplainConfig) -> ExplainResult:
    """Run the run's backbones over the images, encode them, write OUT/ (module docstring)."""
    from usae.pipeline.extract_task import compute_images, decode_image

    t0 = time.perf_counter()
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))
    try:
        model, run_cfg, store = open_run(cfg.run, cfg.store, cfg.device)
    except BackboneError as e:
        raise ExplainError(str(e)) from e
    items = image_items(cfg.images, cfg.image_root)
    keys = list(model.spec.backbones)
    try:
        targets = load_targets(model, run_cfg, store, cfg.weights, cfg.device, cfg.dtype)
    except BackboneError as e:
        raise ExplainError(str(e)) from e
    members, member_source = member_sets(model, keys, cfg.report)
    dtype = torch.float32
    model = prepare_model(model, dtype, cfg.device)
    batch = cfg.batch_size or int(
        (store.attrs.get("extra") or {}).get("extract", {}).get("batch_size", 32)
    )
    backbones = [t.backbone for t in targets]
    groups = [(t.key,) for t in targets]
    sizes = tuple(sorted({b.spec.img_size for b in backbones}))
    grid = tuple(store.grid)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "thumbs", ignore_errors=True)  # a previous explain's maps would linger
    codes_w = _CodesWriter(out / "codes.parquet")
    per_image, failures, forward_s = [], [], 0.0
    chunks = [items[a : a + cfg.chunk_images] for a in range(0, len(items), cfg.chunk_images)]
    with (
        progress_bar(cfg.progress, info=True) as bar,
        ThreadPoolExecutor(cfg.decode_threads) as pool,
    ):
        task = bar.add_task("explain images", total=len(items), info="")

        def submit(chunk):
            return [pool.submit(decode_image, f, sizes) for _, f, _ in chunk]

        nxt = submit(chunks[0]) if chunks else []
        done = 0
        for c, chunk in enumerate(chunks):
            cur, nxt = nxt, (submit(chunks[c + 1]) if c + 1 < len(chunks) else [])
            f0 = time.perf_counter()
            res = compute_images(
                backbones, groups, chunk, cur, grid=grid, batch_size=batch, device=cfg.device
            )
            forward_s += time.perf_counter() - f0
            failures += res.failures
            t = grid[0] * grid[1]
            for j, (iid, _file, path) in enumerate(chunk):
                n = done + j
                if not res.valid[j]:
                    continue
                tokens = [res.tokens[key][j * t : (j + 1) * t] for key in keys]
                codes = encode_image(model, tokens, dtype)
                codes_w.add(iid, keys, codes)
                tops = top_concepts(codes.z_Mtm, keys, members, cfg.top)
                per_image.append({"index": n, "image_id": iid, "path": path, "top": tops})
                if cfg.thumbs:
                    shown = list(dict.fromkeys(e["concept"] for v in tops.values() for e in v))
                    pic = _picture(cur[j].result().images)
                    write_image_thumbs(out, n, pic, codes.z_Mtm, grid, keys, shown)
            codes_w.flush()
            done += len(chunk)
            bar.advance(task, len(chunk))
            speed = bar.tasks[0].speed
            bar.update(task, info=f"{speed:.1f} img/s" if speed else "")
    codes_w.close()
    for f in failures:
        print(
            f"warning: skipped image {f['image_id']} ({f['path']}): {f['reason']}", file=sys.stderr
        )
    seconds = time.perf_counter() - t0
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run": str(cfg.run),
        "store": str(store.path),
        "backbones": keys,
        "grid": list(grid),
        "concepts": model.spec.concepts,
        "k": model.spec.k,
        "membership": member_source,
        "n_images": len(items),
        "explained": len(per_image),
        "failures": failures,
        "seconds": seconds,
        "forward_seconds": forward_s,
        "images_per_second": len(items) / seconds if seconds > 0 else None,
        "images": per_image,
        "config": config_json(cfg),
    }
    atomic_write_json(out / "explain.json", summary, indent=1)
    _write_top_table(out / "top.parquet", per_image, keys)
    index = render_explain(out, cfg.report) if cfg.thumbs else None
    if not per_image:
        raise ExplainError(
            f"none of the {len(items)} images could be read (reasons in {out / 'explain.json'})"
        )
    return ExplainResult(out, len(items), len(per_image), failures, seconds, index)


def _write_top_table(path: Path, per_image: list[dict], keys: Sequence[str]) -> None:
    rows = [
        {"image_id": im["image_id"], "backbone": key, "rank": r, "concept": e["concept"],
         "max": e["max"], "mean": e["mean"], "tokens": e["tokens"], "members": e["members"],
         "fires_in": "+".join(e["fires_in"])}
        for im in per_image for key in keys for r, e in enumerate(im["top"][key])
    ]  # fmt: skip
    cols = [
        "image_id",
        "backbone",
        "rank",
        "concept",
        "max",
        "mean",
        "tokens",
        "members",
        "fires_in",
    ]
    df = pd.DataFrame(rows, columns=cols).astype(
        {"rank": "int32", "concept": "int32", "tokens": "int32"}
    )
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


# ---------------------------------------------------------------- page
def render_explain(out: str | Path, report: str | Path | None = None) -> Path:
    """OUT/explain.json + thumbs/ -> OUT/index.html (self-contained; relative links)."""
    import json

    from usae.analysis.render import html_page

    out = Path(out)
    s = json.loads((out / "explain.json").read_text())
    keys = s["backbones"]
    esc = html.escape
    pages = _report_pages(out, report)
    parts = [
        "<h1>usae explain</h1>",
        f'<p class="meta">run {esc(s["run"])} &middot; store {esc(s["store"])} &middot; '
        f"{s['explained']} of {s['n_images']} images explained &middot; member sets: "
        f"{esc(s['membership'])}</p>",
        '<p class="lede">For each image, the concepts that fire most in each backbone (by the '
        "largest code over its tokens). Each concept shows its code on every token in every "
        "backbone (one colour scale per concept; brighter is stronger), the backbones it lives "
        "in, and those it fires in on this image.</p>",
    ]
    if s["failures"]:
        items = "".join(
            f"<li><b>{esc(f['image_id'])}</b> ({esc(f['path'])}): {esc(f['reason'])}</li>"
            for f in s["failures"]
        )
        parts.append(
            f'<section class="failures"><h2>Skipped images ({len(s["failures"])})</h2><ul>{items}</ul></section>'
        )
    for im in s["images"]:
        parts.append(_image_card(out, im, keys, pages))
    index = out / "index.html"
    atomic_write(index, html_page("usae explain", "\n".join(parts)))
    return index


def _report_pages(out: Path, report: str | Path | None) -> dict[int, str]:
    """concept -> link (relative to OUT) to its page in the report, for those that have one."""
    if report is None or not (Path(report) / "concepts").is_dir():
        return {}
    base = os.path.relpath(Path(report) / "concepts", out)
    return {
        int(p.stem): f"{base}/{p.name}"
        for p in (Path(report) / "concepts").glob("*.html")
        if p.stem.isdigit()
    }


def _image_card(out: Path, im: dict, keys: Sequence[str], pages: dict[int, str]) -> str:
    from usae.analysis.render import thumb_img

    esc = html.escape
    n = im["index"]
    photo = thumb_img(out, f"{thumb_dir(n)}/photo.jpg", f"image {im['image_id']}")
    rows = []
    for key in keys:
        cards = []
        for e in im["top"][key]:
            k = e["concept"]
            heats = "".join(
                f"<figure>{thumb_img(out, token_map_file(n, k, kk), f'{kk} token map of concept {k}')}"
                f"<figcaption>{esc(kk)}</figcaption></figure>"
                for kk in keys
            )
            badge = f'<span class="badge">{esc(e["members"])}</span>' if e["members"] else ""
            name = f'<a href="{pages[k]}">#{k}</a>' if k in pages else f"#{k}"
            here = ", ".join(e["fires_in"])
            cards.append(
                f'<div class="gcard"><div class="ghead"><span class="gk">{name}</span>{badge}</div>'
                f'<div class="gmain">{heats}</div><div class="gfoot">max {e["max"]:.3g} &middot; '
                f"{e['tokens']} tokens &middot; fires here in {esc(here)}</div></div>"
            )
        body = "".join(cards) or '<p class="meta">no concept fires</p>'
        rows.append(f'<h3>{esc(key)}: top concepts</h3><div class="gallery compact">{body}</div>')
    return (
        f'<section class="eimage" id="image-{n}"><h2>{esc(im["image_id"])}</h2>'
        f'<div class="ephoto"><figure>{photo}<figcaption>{esc(im["path"])}</figcaption></figure></div>'
        f'<div class="erows">{"".join(rows)}</div></section>'
    )
