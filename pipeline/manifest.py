"""Image folder -> manifest table (Parquet or CSV), and manifest file -> validated table.

A manifest lists the images of a data set, one row per image, in the order the store keeps
them. Columns (all stored and read as strings; a missing value is the empty string):

- ``image_id`` (required): unique, stable name of the image; the store's key.
- ``path`` (required): path relative to an image root, or an fsspec URL (``s3://...``).
- ``split`` (optional): ``train`` / ``val`` / ``test``; anything but ``train`` is held out
  when a stage is asked to hold out by split.
- ``label`` (optional): class or source name. ``sha256`` (optional): hash of the file bytes.
- Any other column is kept as is (e.g. ``source`` in the demo manifest).

The image root of a manifest file is, unless given, the folder the manifest file is in.
``read_manifest`` refuses duplicate ids and paths that leave the image root (absolute paths
outside it, ``..``, symlinks that resolve outside it). ``manifest_sha256`` hashes the table's
content, not its file format: the same table as CSV or Parquet has the same hash.

``build_manifest`` makes one from a folder tree: files walked in sorted order, ``image_id``
= relative path without extension (POSIX separators). When two files would get the same id
(``a.jpg`` and ``a.png``), every file in that collision keeps its extension in its id
(``a.jpg``, ``a.png``); repeated until all ids are unique. An id is therefore stable as long
as no file with the same name but another extension is added next to it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from usae.pipeline.images import has_scheme

from usae.errors import UsaeError
from usae.runtime import atomic_path, progress_bar

REQUIRED_COLUMNS = ("image_id", "path")
OPTIONAL_COLUMNS = ("split", "label", "sha256")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
_EXAMPLES = 5  # how many offending rows an error message lists
_HASH_THREADS = 4  # files hashed at once (I/O bound on network and cold disks)


class ManifestError(UsaeError, ValueError):
    """A manifest that cannot be used (missing columns, duplicate ids, escaping paths)."""


# ---------------------------------------------------------------- paths
def resolve_path(root: str | os.PathLike | None, rel: str) -> str | Path:
    """Where a manifest ``path`` points: a URL string (fsspec) or a local ``Path``.

    ``rel`` with a scheme is used as is; with a URL root it is joined with ``/``; an absolute
    local path stays absolute; anything else is relative to ``root`` (cwd when None).
    """
    if has_scheme(rel):
        return rel
    if root is not None and has_scheme(root):
        return os.fspath(root).rstrip("/") + "/" + rel.lstrip("/")
    p = Path(rel)
    if p.is_absolute() or root is None:
        return p
    return Path(root) / p


def manifest_items(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(image_id, file to read, path as listed) of every row of a manifest table, paths
    resolved against its ``attrs["image_root"]`` (`read_manifest`, `build_manifest`)."""
    root = df.attrs.get("image_root")
    return [
        (str(i), os.fspath(resolve_path(root, str(p))), str(p))
        for i, p in zip(df["image_id"], df["path"], strict=True)
    ]


def open_path(resolved: str | os.PathLike):
    """Binary file object for a resolved path: through fsspec for URLs, ``open`` otherwise."""
    if has_scheme(resolved):
        import fsspec

        return fsspec.open(os.fspath(resolved), "rb").open()
    return open(resolved, "rb")


def _inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _PathChecker:
    """Why a manifest path leaves the image root (None when it stays inside), one path at a
    time; the real path and the symlinks of each folder are looked up once per folder."""

    def __init__(self, root: str | os.PathLike):
        self.url_root = has_scheme(root)
        self.root_abs = os.path.abspath(root) if not self.url_root else ""
        self.root_real = os.path.realpath(root) if not self.url_root else ""
        self._folders: dict[str, tuple[str, frozenset[str]]] = {}

    def folder(self, path: str) -> tuple[str, frozenset[str]]:
        """(real path, names of the symlinks in it) of a local folder, cached."""
        if path not in self._folders:
            real = os.path.normpath(os.path.realpath(path))
            self._folders[path] = (real, _symlinks_in(real))
        return self._folders[path]

    def __call__(self, rel: str) -> str | None:
        if has_scheme(rel):
            return None  # a full URL names its own location
        if self.url_root:  # lexical check only (object stores have no symlinks)
            norm = posixpath.normpath(rel)
            bad = rel.startswith("/") or norm == ".." or norm.startswith("../")
            return "leaves the image root" if bad else None
        joined = os.path.join(self.root_abs, rel)  # an absolute rel replaces the root
        if not _inside(os.path.normpath(joined), self.root_abs):
            return (
                "absolute path outside the image root"
                if os.path.isabs(rel)
                else "'..' leaves the image root"
            )
        parent, name = os.path.split(joined)
        real_parent, links = self.folder(parent)
        real = os.path.realpath(joined) if name in links else os.path.join(real_parent, name)
        return (
            None
            if _inside(os.path.normpath(real), self.root_real)
            else "symlink resolves outside the image root"
        )


def _symlinks_in(folder: str) -> frozenset[str]:
    """Names of the symlinks in a folder (one directory listing, no stat per file)."""
    try:
        with os.scandir(folder) as it:
            return frozenset(e.name for e in it if e.is_symlink())
    except OSError:  # missing or unreadable folder: its files will fail at decoding
        return frozenset()


# Paths that are relative, with no '.', '..' or empty component, no backslash and no colon
# (so no URL) cannot leave the root lexically: only their folder's real path and their own
# symlink matter. Anything matching this goes through the one-by-one check instead.
_NOT_PLAIN = r"^/|(?:^|/)\.{1,2}(?:/|$)|//|/$|\\|:"


def escaping_paths(df: pd.DataFrame, root: str | os.PathLike) -> list[tuple[int, str]]:
    """(row, reason) of every ``path`` that leaves ``root``, in row order.

    Plain relative paths (the common case) are checked per folder: one realpath and one
    listing per folder, a set lookup per file. Everything else goes through ``_PathChecker``.
    """
    check = _PathChecker(root)
    rels = df["path"].reset_index(drop=True).astype(str)
    if check.url_root:
        plain = pd.Series(False, index=rels.index)
    else:
        plain = ~rels.str.contains(_NOT_PLAIN, regex=True)
    bad = [(i, why) for i in np.flatnonzero(~plain.to_numpy()) if (why := check(rels[i]))]
    if not plain.any():
        return bad
    parts = rels[plain].str.rpartition("/")
    for folder, rows in parts.groupby(0, sort=False).groups.items():
        real_dir, links = check.folder(os.path.join(check.root_abs, folder))
        if not _inside(real_dir, check.root_real):
            bad += [(int(i), "symlink resolves outside the image root") for i in rows]
        elif links:
            bad += [
                (int(i), why) for i in rows if parts.at[i, 2] in links and (why := check(rels[i]))
            ]
    return sorted(bad)


def check_paths(df: pd.DataFrame, root: str | os.PathLike) -> None:
    """Raise ManifestError listing rows whose path leaves ``root``."""
    bad = escaping_paths(df, root)
    if bad:
        ids = df["image_id"].to_numpy()
        paths = df["path"].to_numpy()
        shown = "; ".join(f"{ids[i]!r}: {paths[i]!r} ({why})" for i, why in bad[:_EXAMPLES])
        raise ManifestError(
            f"{len(bad)} path(s) leave the image root {os.fspath(root)!r}, e.g. {shown}"
        )


# ---------------------------------------------------------------- table rules
def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Every column as str, missing -> "" (the form that is written, read and hashed).

    Float columns holding only whole numbers are written as integers ("3", not "3.0").
    """
    out = {}
    for c in df.columns:
        col = df[c].reset_index(drop=True)
        if pd.api.types.is_float_dtype(col) and (col.dropna() % 1 == 0).all():
            col = col.astype("Int64")  # ints that pandas made float because of a missing value
        col = col.astype(object)
        missing = col.isna().to_numpy()
        vals = col.astype(str)
        vals[missing] = ""
        out[str(c)] = vals
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)), columns=[str(c) for c in df.columns])


def validate(df: pd.DataFrame) -> None:
    """Required columns present, ids and paths non-empty, ids unique (errors list examples)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"manifest lacks required column(s) {missing}; it has {list(df.columns)}"
        )
    for c in REQUIRED_COLUMNS:
        empty = df.index[df[c] == ""].tolist()
        if empty:
            raise ManifestError(
                f"{len(empty)} row(s) have an empty {c!r}, e.g. rows {empty[:_EXAMPLES]}"
            )
    ids = df["image_id"]
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        dups = list(Counter(repeated).items())  # first-seen order
        shown = ", ".join(f"{k!r} x{n}" for k, n in dups[:_EXAMPLES])
        raise ManifestError(f"{len(dups)} duplicate image_id value(s), e.g. {shown}")


def manifest_sha256(df: pd.DataFrame) -> str:
    """Hex sha256 of the table's content: row order matters, column order and format do not."""
    c = canonical(df)
    h = hashlib.sha256(b"usae-manifest-v1\n")
    for name in sorted(c.columns):
        h.update(json.dumps([name, c[name].tolist()], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- files
def _kind(path: str | os.PathLike) -> str:
    suf = posixpath.splitext(os.fspath(path))[1].lower()
    if suf in (".parquet", ".pq"):
        return "parquet"
    if suf == ".csv":
        return "csv"
    raise ManifestError(f"{os.fspath(path)}: a manifest must end in .parquet or .csv")


def write_manifest(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Validate and write (atomically) as Parquet or CSV, chosen by the suffix of ``out``."""
    out = Path(out)
    kind = _kind(out)
    c = canonical(df)
    validate(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if kind == "parquet":
            c.to_parquet(tmp, index=False)
        else:
            # pandas leaves a lone "\r" unquoted, which splits the row on reading: quote all then
            has_cr = any(c[col].str.contains("\r", regex=False).any() for col in c.columns)
            quoting = csv.QUOTE_ALL if has_cr else csv.QUOTE_MINIMAL
            c.to_csv(tmp, index=False, lineterminator="\n", quoting=quoting)
    return out


def read_manifest(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> pd.DataFrame:
    """Read a Parquet or CSV manifest (a local file or an fsspec URL), validate it, and
    return it with string columns.

    ``image_root`` defaults to the manifest's folder. The returned frame's ``attrs`` hold
    ``image_root`` (str) and ``manifest_sha256`` for the stages that follow.
    """
    kind = _kind(path)
    url = has_scheme(path)
    if not url and not Path(path).is_file():
        raise ManifestError(f"manifest {os.fspath(path)} not found")
    try:
        with open_path(path) as fh:
            if kind == "parquet":
                raw = pd.read_parquet(fh)
            else:
                raw = pd.read_csv(fh, dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        raise ManifestError(f"manifest {os.fspath(path)} not found") from None
    except Exception as e:  # noqa: BLE001 - a broken file is a user error with a clear message
        raise ManifestError(
            f"cannot read manifest {os.fspath(path)}: {type(e).__name__}: {e}"
        ) from None
    df = canonical(raw)
    validate(df)
    if image_root is not None:
        root = os.fspath(image_root)
    else:
        root = os.fspath(path).rsplit("/", 1)[0] if url else str(Path(path).parent)
    check_paths(df, root)
    df.attrs["image_root"] = root
    df.attrs["manifest_sha256"] = manifest_sha256(df)
    return df


# ---------------------------------------------------------------- building from a folder
class _Found(NamedTuple):
    rel: str  # POSIX path relative to the folder
    stem_id: str  # rel without extension


def _walk(image_dir: Path, extensions: Sequence[str]) -> tuple[list[_Found], int]:
    """Sorted image files under image_dir (hidden entries skipped, symlinked folders not
    followed); also the count of file symlinks skipped because they resolve outside."""
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    root_real = os.path.realpath(image_dir)
    found, skipped, todo = [], 0, [""]  # todo: folders relative to image_dir (POSIX)
    while todo:
        rel_dir = todo.pop()
        try:
            with os.scandir(image_dir / rel_dir) as it:
                entries = list(it)
        except OSError as e:
            raise ManifestError(
                f"cannot list folder {image_dir / rel_dir}: {e.strerror or e}"
            ) from None
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                todo.append(rel)
            elif os.path.splitext(e.name)[1].lower() in exts and e.is_file():
                if e.is_symlink() and not _inside(os.path.realpath(e.path), root_real):
                    skipped += 1
                    continue
                found.append(_Found(rel, os.path.splitext(rel)[0]))
    found.sort(key=lambda f: f.rel)
    return found, skipped


def unique_ids(found: Sequence[_Found]) -> tuple[list[str], int]:
    """ids = stems; files in a collision keep their extension (repeat until unique).
    Also returns how many files keep their extension."""
    full = [False] * len(found)
    while True:
        ids = [f.rel if k else f.stem_id for f, k in zip(found, full, strict=True)]
        counts = Counter(ids)
        clash = [i for i, x in enumerate(ids) if counts[x] > 1 and not full[i]]
        if not clash:
            return ids, sum(full)
        for i in clash:
            full[i] = True


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hashes(image_dir: Path, rels: Sequence[str], show_progress: bool) -> list[str]:
    """sha256 of every file, in order; a few threads (hashlib and file reads release the GIL)."""
    out = []
    with (
        progress_bar(show_progress, transient=True) as bar,
        ThreadPoolExecutor(_HASH_THREADS) as pool,
    ):
        task = bar.add_task("hashing images", total=len(rels))
        for digest in pool.map(_sha256_file, (image_dir / r for r in rels)):
            out.append(digest)
            bar.advance(task)
    return out


def build_manifest(
    image_dir: str | os.PathLike,
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    split_from_dirs: bool = True,
    label_from_parent: bool = False,
    hash_files: bool = True,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Manifest of every image file under ``image_dir`` (see the module docstring for ids).

    ``split`` (column added only when some file is under one) is the first folder level when
    it is train/val/test, else "". ``label`` is the parent folder's name (ImageFolder layout).
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ManifestError(f"{image_dir} is not a folder")
    found, skipped = _walk(image_dir, tuple(extensions))
    ids, kept_ext = unique_ids(found)
    rels = [f.rel for f in found]
    df = pd.DataFrame({"image_id": ids, "path": rels})
    if split_from_dirs:
        split = [
            r.split("/", 1)[0] if "/" in r and r.split("/", 1)[0] in SPLITS else "" for r in rels
        ]
        if any(split):
            df["split"] = split
    if label_from_parent:
        df["label"] = [posixpath.basename(posixpath.dirname(r)) for r in rels]
    if hash_files:
        df["sha256"] = _hashes(image_dir, rels, show_progress)
    df.attrs.update(
        {"image_root": str(image_dir), "ids_with_extension": kept_ext, "skipped_symlinks": skipped}
    )
    return df


# ---------------------------------------------------------------- the `usae manifest` stage
@dataclass(frozen=True)
class ManifestConfig:
    """`usae manifest`: build a manifest from a folder of images."""

    image_dir: Path
    """Folder to walk (recursively, sorted); manifest paths are relative to it."""
    out: Path = Path("manifest.parquet")
    """Manifest file to write: .parquet or .csv."""
    split_from_dirs: bool = True
    """Take `split` from a first-level train/val/test folder."""
    label_from_parent: bool = False
    """Set `label` to each file's parent folder name (ImageFolder layout)."""
    hash_files: bool = True
    """Store the sha256 of each file's bytes (reads every file once)."""
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    """File extensions counted as images (case-insensitive)."""

    def __post_init__(self) -> None:
        if not Path(self.image_dir).is_dir():
            raise ManifestError(f"{self.image_dir} is not a folder")
        _kind(self.out)  # .parquet, .pq or .csv
        if not self.extensions:
            raise ManifestError("give at least one extension")


class ManifestResult(NamedTuple):
    """What `run_manifest` wrote."""

    path: Path  # the manifest file
    n_images: int  # rows
    manifest_sha256: str  # content hash (format-independent)
    splits: dict[str, int]  # images per split ("" = none)
    ids_with_extension: int  # files whose id keeps its extension (name collisions)
    skipped_symlinks: int  # symlinks skipped because they point outside the folder


def run_manifest(cfg: ManifestConfig) -> ManifestResult:
    """Build, check and write the manifest of ``cfg.image_dir``."""
    df = build_manifest(
        cfg.image_dir,
        extensions=cfg.extensions,
        split_from_dirs=cfg.split_from_dirs,
        label_from_parent=cfg.label_from_parent,
        hash_files=cfg.hash_files,
    )
    if len(df) == 0:
        raise ManifestError(
            f"no image files under {cfg.image_dir} (extensions {', '.join(cfg.extensions)})"
        )
    check_paths(df, cfg.image_dir)
    path = write_manifest(df, cfg.out)
    splits = dict(Counter(df["split"])) if "split" in df else {}
    return ManifestResult(
        path,
        len(df),
        manifest_sha256(df),
        splits,
        df.attrs["ids_with_extension"],
        df.attrs["skipped_symlinks"],
    )
