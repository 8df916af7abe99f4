"""A raw zarr v3 chunk file <-> numpy rows, without zarr: open, read into a buffer, map, and
write (temp + rename), with the OS read-ahead hints that keep loaders fed.

A raw chunk (no compressor, little-endian, default chunk-key encoding) is exactly the
array's bytes, the edge chunk padded to the full chunk shape. `usae.pipeline.store` decides
which chunk lives in which file and what counts as an error; this module only moves bytes.
"""

from __future__ import annotations

import mmap
import os
from typing import BinaryIO

import numpy as np

from usae.runtime import atomic_write

_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)  # absent where the OS has no madvise


def is_raw(arr) -> bool:
    """Whether a zarr v3 array's chunk files are its bytes as they are (no codec but 'bytes',
    '/'-separated default keys, little-endian or single-byte dtype)."""
    md = arr.metadata
    try:
        codecs = [c.to_dict()["name"] for c in md.codecs]
    except Exception:  # noqa: BLE001
        return False
    enc = getattr(md, "chunk_key_encoding", None)
    sep_ok = (
        enc is not None
        and getattr(enc, "separator", "/") == "/"
        and getattr(enc, "name", "default") == "default"
    )
    return codecs == ["bytes"] and sep_ok and np.dtype(arr.dtype).byteorder in "<=|"


def page_cached(fd: int, nbytes: int) -> bool:
    """Whether the first and last byte of a file's first `nbytes` are in the page cache (a read
    that must not wait, RWF_NOWAIT, where the OS has it; otherwise assume they are not)."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or not hasattr(os, "preadv"):
        return False
    probe = bytearray(1)
    try:
        return all(os.preadv(fd, [probe], off, nowait) == 1 for off in {0, nbytes - 1})
    except OSError:  # EAGAIN: not cached (or the file system cannot tell)
        return False


def open_file(path: str) -> tuple[int | None, int]:
    """(read-only descriptor, size in bytes) of a chunk file; (None, 0) when it does not exist
    (a chunk never written: zarr's fill value)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None, 0
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def advise_willneed(fd: int, nbytes: int) -> None:
    """Start read-ahead of the first `nbytes` unless they are cached already (on cached files
    POSIX_FADV_WILLNEED only slows concurrent reads of them). Closes `fd` if it fails."""
    if hasattr(os, "posix_fadvise") and not page_cached(fd, nbytes):
        try:
            os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_WILLNEED)
        except BaseException:
            os.close(fd)
            raise


def read_into(fd: int, out: np.ndarray, nbytes: int) -> int:
    """Read the first `nbytes` of the file into `out` (contiguous); closes `fd`; bytes read."""
    with open(fd, "rb") as fh:
        return fh.readinto(memoryview(out.reshape(-1)).cast("B")[:nbytes])


def map_rows(fd: int, nbytes: int, width: int, dtype=np.float16) -> np.ndarray:
    """The first `nbytes` of the file as a read-only (rows, width) array of `dtype` (float16 or
    int8 tokens) over its pages
    (no copy); closes `fd` (the mapping stays until the array goes). Unless the file is cached,
    the OS is told the pages will be needed (MADV_WILLNEED: read-ahead starts now); they are
    mapped on first touch (cheaper than MAP_POPULATE for cached files)."""
    try:
        m = mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ)
        cached = page_cached(fd, nbytes)
    finally:
        os.close(fd)
    if _WILLNEED is not None and not cached:
        m.madvise(_WILLNEED)
    dtype = np.dtype(dtype)
    return np.frombuffer(m, dtype).reshape(nbytes // (dtype.itemsize * width), width)


def write_padded(path: str | os.PathLike, x: np.ndarray, full_bytes: int) -> None:
    """Write a contiguous array as a chunk file padded with zeros to `full_bytes` (the edge
    chunk: zarr stores the full chunk shape), atomically: one open, one rename."""

    def write(fh: BinaryIO) -> None:
        x.tofile(fh)  # faster than fh.write(memoryview) for large arrays
        if x.nbytes < full_bytes:
            fh.truncate(full_bytes)  # zero-filled, i.e. the fill value

    atomic_write(path, write)
