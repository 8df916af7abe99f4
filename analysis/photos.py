"""--manifest/--image-root, else the store's record of its images -> the manifest table, each
image's path, and the pictures themselves (`usae analyze` and `usae maximize`).

`usae extract` records in the store where its images were (root attribute ``image_source``:
the manifest and image root as given and resolved, ``usae.pipeline.store.Store.image_source``),
so the stages after it show photos without being told again. The flags override the record.
A recorded manifest or image folder that has moved is a warning (appended to ``notes``), never
an error: the report is written without photos. A manifest given on the command line that
cannot be read is an error (the user asked for it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from usae.errors import UsaeError


class ImageSourceError(UsaeError, ValueError):
    """A manifest given on the command line cannot be read."""


def manifest_for(
    manifest: str | os.PathLike | None,
    image_root: str | os.PathLike | None,
    store: Any,
    notes: list[str],
) -> pd.DataFrame | None:
    """The manifest table (every column; ``attrs["image_root"]`` the folder its paths are
    relative to) from ``manifest`` (and ``image_root``) when given, else from the store's
    ``image_source`` record; None when there is neither, or when the recorded manifest or
    image folder is gone (a one-line warning appended to ``notes``).

    The recorded manifest is looked for at its absolute path, then as given (relative to the
    working directory); the image root likewise (an image root recorded as "" is the folder
    of the manifest found). ``store``: a ``usae.pipeline.store.Store`` (or None).
    """
    from usae.pipeline.manifest import ManifestError, read_manifest

    if manifest:
        try:
            return read_manifest(manifest, image_root or None)
        except (ManifestError, OSError, ValueError) as e:
            raise ImageSourceError(f"cannot read manifest {os.fspath(manifest)}: {e}") from None
    rec = getattr(store, "image_source", None)
    if not rec:
        return None
    found = _first_existing(rec.get("manifest_abs"), rec.get("manifest"), _exists)
    if found is None:
        notes.append(
            f"the store's manifest {rec.get('manifest_abs') or rec.get('manifest')} was not "
            "found (moved?): no photos; pass --manifest (and --image-root)"
        )
        return None
    root = image_root or None
    if root is None and rec.get("image_root"):
        root = _first_existing(rec.get("image_root_abs"), rec.get("image_root"), _is_dir)
        if root is None:
            notes.append(
                f"the store's image folder {rec.get('image_root_abs')} was not found (moved?): "
                "no photos; pass --image-root"
            )
            return None
    try:
        df = read_manifest(found, root)
    except (ManifestError, OSError, ValueError) as e:
        notes.append(f"the store's manifest {found} cannot be read ({e}): no photos")
        return None
    root_now = df.attrs["image_root"]
    if not _has_scheme(root_now) and not Path(root_now).is_dir():
        notes.append(f"the store's image folder {root_now} was not found (moved?): no photos")
        return None
    want = store.attrs.get("manifest_sha256") if hasattr(store, "attrs") else None
    if want and df.attrs.get("manifest_sha256") != want:
        notes.append(
            f"the store's manifest {found} changed since extraction (another sha256): "
            "photos matched by image_id"
        )
    return df


def image_paths(df: pd.DataFrame | None) -> dict[str, Any] | None:
    """image_id -> resolved path (a local Path or a URL) of a manifest table (None: None)."""
    if df is None:
        return None
    from usae.pipeline.manifest import resolve_path

    root = df.attrs.get("image_root")
    return {
        str(i): resolve_path(root, str(p)) for i, p in zip(df["image_id"], df["path"], strict=True)
    }


def load_picture(paths: dict | None, image_id: str) -> tuple[np.ndarray | None, str | None]:
    """(RGB uint8 picture or None, why it is missing or None). No paths: (None, None)."""
    if paths is None:
        return None, None
    if image_id not in paths:
        return None, "not in the manifest"
    from usae.pipeline.images import ImageError, load_image

    try:
        return load_image(paths[image_id]), None
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - any unreadable picture becomes a placeholder
        return None, f"{type(e).__name__}: {e}"


def _has_scheme(p: Any) -> bool:
    from usae.pipeline.images import has_scheme

    return has_scheme(p)


def _exists(p: str) -> bool:
    return _has_scheme(p) or Path(p).is_file()


def _is_dir(p: str) -> bool:
    return _has_scheme(p) or Path(p).is_dir()


def _first_existing(a: str | None, b: str | None, ok) -> str | None:
    for p in (a, b):
        if p and ok(p):
            return p
    return None
