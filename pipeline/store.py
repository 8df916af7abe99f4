"""Token activations <-> the on-disk store (zarr v3), the contract between every stage.

Layout, attributes and commit protocol are documented in docs/contracts.md. In short: one
float16 array per backbone of shape (n_images * tokens_per_image, width), image-major, the
same chunk rows in every backbone, no compressor; a chunk is committed by a small JSON marker
written after its data, so an interrupted writer resumes by skipping committed chunks.

An int8 store (``store_dtype="int8"``, half the bytes) holds the same rows as symmetric int8
codes with one float32 scale per (chunk, channel): ``backbones/<key>/scale`` (n_chunks, width),
value = code * scale[chunk]. The scale is the chunk's per-channel absmax / 127, so no value is
ever clipped and every element is within half a scale step of its float16 value; statistics
are computed on the unquantised (float16) rows, exactly as for a float16 store.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from usae.pipeline import chunk_files

from usae.errors import UsaeError
from usae.runtime import atomic_write, atomic_write_json

SCHEMA_VERSION = 1
FORMAT = "usae-activations"
_META = "_usae"
STORE_DTYPES = ("float16", "int8")
"""Token dtypes a store can hold: float16 (the default) or int8 codes with per-chunk, per-channel scales."""
INT8_MAX = 127  # symmetric codes in [-127, 127]: -128 is never used, so negation is exact


class StoreError(UsaeError, RuntimeError):
    """A store is missing, incomplete, incompatible or malformed."""


def _zarr():
    import zarr

    warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
    warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    return zarr


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a store's content."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("zarr", "torch", "timm", "open_clip", "dask", "PIL"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional libraries
            continue
    return out


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- int8 codes
def quantize_int8(x_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes (n, d), float32 scale (d,)) of one chunk's rows: symmetric, per channel.

    scale = max |x| over the rows / 127, code = round(x / scale), so |x - code * scale| <=
    scale / 2 for every element and nothing is clipped (a per-chunk absmax needs no pass over
    the whole store first, unlike a scale from the store's statistics, and adapts to each
    chunk). A channel that is zero in every row gets scale 0 (codes 0); one holding NaN/inf
    gets a non-finite scale and codes 0, so its dequantised rows are non-finite, as its float16
    rows were (and as the statistics, computed on those rows, say)."""
    x = np.asarray(x_nd, dtype=np.float32)
    d = x.shape[1]
    if x.shape[0] == 0:
        return np.zeros(x.shape, np.int8), np.zeros(d, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = np.abs(x).max(axis=0)
        scale = (amax / np.float32(INT8_MAX)).astype(np.float32)
        ok = np.isfinite(scale) & (scale > 0)
        q = np.rint(x / np.where(ok, scale, np.float32(1)))
    q = np.where(ok, np.clip(np.nan_to_num(q, nan=0.0), -INT8_MAX, INT8_MAX), 0)
    return q.astype(np.int8), scale


def dequantize_int8(
    q_nd: np.ndarray, scale_d: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """float32 rows of int8 codes: code * scale (per channel)."""
    return np.multiply(q_nd, np.asarray(scale_d, np.float32), out=out, dtype=np.float32)


# ---------------------------------------------------------------- running statistics
@dataclass
class RunningStats:
    """Exact per-channel count/mean/M2 (float64), mergeable across chunks (Chan et al.)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, width: int) -> RunningStats:
        return cls(0, np.zeros(width, np.float64), np.zeros(width, np.float64))

    @classmethod
    def of(cls, x_nd: np.ndarray) -> RunningStats:
        """Statistics of a block of rows, summed in float64.

        One pass of sums and sums of squares (2x faster than centring first). The usual
        cancellation of that formula is harmless here: inputs are float16 (products exact in
        float64) and blocks are one chunk; chunks are merged with Chan's update.
        """
        x = np.asarray(x_nd, dtype=np.float64)
        n = x.shape[0]
        if n == 0:
            return cls.empty(x.shape[1])
        s1 = x.sum(axis=0)
        s2 = np.einsum("ij,ij->j", x, x)
        mean = s1 / n
        return cls(int(n), mean, np.maximum(s2 - s1 * mean, 0.0))

    def merge(self, other: RunningStats) -> RunningStats:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return RunningStats(n, mean, m2)

    def scalar(self) -> tuple[float, float]:
        """Scalar mean/std over all tokens AND channels (the paper's standardisation)."""
        if self.count == 0:
            return 0.0, 1.0
        d = self.mean.shape[0]
        mu = float(self.mean.mean())
        ss = float(self.m2.sum() + self.count * ((self.mean - mu) ** 2).sum())
        return mu, float(np.sqrt(ss / (self.count * d)))

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, d: Mapping) -> RunningStats:
        return cls(
            int(d["count"]), np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64)
        )


# ---------------------------------------------------------------- layout description
@dataclass(frozen=True)
class BackboneLayout:
    """What the store needs to know about one backbone group."""

    key: str
    width: int
    prefix_tokens: int = 0
    spec: Mapping[str, Any] | None = None


class Store:
    """A usae activation store. `Store.create` to write one, `Store.open` to read one."""

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        zarr = _zarr()
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"{self.path} is not a usae store (no zarr.json)")
        self._root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "r+")
        attrs = dict(self._root.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(
                f"{self.path} is not a usae activation store (format={attrs.get('format')!r})"
            )
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema_version {attrs.get('schema_version')}, this usae reads {SCHEMA_VERSION}"
            )
        self.attrs: dict[str, Any] = attrs
        self.n_images: int = int(attrs["n_images"])
        self.tokens_per_image: int = int(attrs["tokens_per_image"])
        self.grid: tuple[int, int] = tuple(attrs["grid"])  # type: ignore[assignment]
        self.chunk_images: int = int(attrs["chunk_images"])
        self.backbones: list[str] = list(attrs["backbones"])
        self._groups = {k: self._root[f"backbones/{k}"] for k in self.backbones}
        self.widths: dict[str, int] = {k: int(g.attrs["width"]) for k, g in self._groups.items()}
        self.prefix_tokens: dict[str, int] = {
            k: int(g.attrs.get("prefix_tokens", 0)) for k, g in self._groups.items()
        }
        self._direct = {k: chunk_files.is_raw(self._groups[k]["tokens"]) for k in self.backbones}
        self.dtypes: dict[str, np.dtype] = {
            k: np.dtype(self._groups[k]["tokens"].dtype) for k in self.backbones
        }
        """Token dtype per backbone as stored: float16, or int8 (codes; see `scales`)."""
        self._scales: dict[str, np.ndarray] = {}
        self._chunk_dirs = {
            k: os.path.join(self.path, "backbones", k, "tokens", "c") for k in self.backbones
        }
        self._valid_arr = self._root["valid"]
        self._valid_direct = chunk_files.is_raw(self._valid_arr)
        self._image_ids: np.ndarray | None = None

    # ------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        image_ids: Sequence[str],
        backbones: Sequence[BackboneLayout],
        *,
        grid: tuple[int, int],
        chunk_images: int,
        source: str,
        fingerprint_of: Any,
        manifest_sha256: str = "",
        split: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        store_dtype: str = "float16",
        image_source: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Store:
        """Create an empty store, or return the existing one if it was made with the same settings.

        An existing store whose fingerprint differs is refused (never overwritten).
        `image_source` (where the manifest and images are, `usae extract`) is recorded, never
        fingerprinted: resuming an incomplete store from another path records the new one (the
        path that finished it), a complete store keeps its record.
        `store_dtype` "int8" stores int8 codes and per-chunk, per-channel scales (module
        docstring); it is part of the fingerprint (a float16 store's fingerprint is unchanged).
        """
        zarr = _zarr()
        path = Path(path)
        if store_dtype not in STORE_DTYPES:
            raise StoreError(
                f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}"
            )
        if store_dtype != "float16":
            fingerprint_of = {"content": fingerprint_of, "store_dtype": store_dtype}
        fp = fingerprint(fingerprint_of)
        if (path / "zarr.json").exists():
            st = cls(path, mode="r+")
            if st.attrs.get("fingerprint") != fp:
                raise StoreError(
                    f"{path} exists and was built from a different manifest or settings "
                    f"(fingerprint {st.attrs.get('fingerprint')} != {fp}); choose another --store path "
                    "or delete it yourself"
                )
            if image_source is not None and not st.complete:
                st._root.attrs["image_source"] = dict(image_source)
                st.attrs = dict(st._root.attrs)
            return st
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} exists, is not empty and is not a usae store")
        ids = [str(i) for i in image_ids]
        if len(set(ids)) != len(ids):
            raise StoreError("duplicate image ids")
        n = len(ids)
        t = int(grid[0] * grid[1])
        root = zarr.open_group(str(path), mode="w")
        a = root.create_array("image_id", shape=(n,), dtype=str, chunks=(max(n, 1),))
        if n:
            a[:] = np.asarray(ids, dtype=object)
        root.create_array(
            "valid",
            shape=(n,),
            dtype=bool,
            chunks=(chunk_images,),
            fill_value=False,
            compressors=None,
        )
        if split is not None:
            s = root.create_array("split", shape=(n,), dtype=str, chunks=(max(n, 1),))
            if n:
                s[:] = np.asarray([str(x) for x in split], dtype=object)
        if labels is not None:  # one categorical label per image ("" = none), like the split
            if len(labels) != n:
                raise StoreError(f"{len(labels)} labels for {n} images")
            s = root.create_array("label", shape=(n,), dtype=str, chunks=(max(n, 1),))
            if n:
                s[:] = np.asarray([str(x) for x in labels], dtype=object)
        bb = root.create_group("backbones")
        for b in backbones:
            g = bb.create_group(b.key)
            g.create_array(
                "tokens",
                shape=(n * t, b.width),
                dtype=store_dtype,
                chunks=(chunk_images * t, b.width),
                compressors=None,
                fill_value=0.0,
                config={"write_empty_chunks": True},
            )
            if store_dtype == "int8":
                g.create_array(
                    "scale",
                    shape=(-(-n // chunk_images), b.width),
                    dtype="float32",
                    chunks=(1, b.width),
                    compressors=None,
                    fill_value=0.0,
                    config={"write_empty_chunks": True},
                )
            if b.prefix_tokens:
                g.create_array(
                    "prefix",
                    shape=(n, b.prefix_tokens, b.width),
                    dtype="float16",
                    chunks=(chunk_images, b.prefix_tokens, b.width),
                    compressors=None,
                    fill_value=0.0,
                    config={"write_empty_chunks": True},
                )
            g.attrs.update(
                {
                    "width": b.width,
                    "prefix_tokens": b.prefix_tokens,
                    "spec": dict(b.spec or {}),
                    "store_dtype": store_dtype,
                }
            )
        root.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "format": FORMAT,
                "source": source,
                "n_images": n,
                "tokens_per_image": t,
                "grid": [int(grid[0]), int(grid[1])],
                "chunk_images": int(chunk_images),
                "backbones": [b.key for b in backbones],
                "fingerprint": fp,
                "manifest_sha256": manifest_sha256,
                "library_versions": library_versions(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "complete": False,
                "failures": [],
                "extra": dict(extra or {}),
                **({"image_source": dict(image_source)} if image_source is not None else {}),
            }
        )
        (path / _META / "commits").mkdir(parents=True, exist_ok=True)
        return cls(path, mode="r+")

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_complete: bool = True) -> Store:
        st = cls(path, mode="r")
        if require_complete and not st.complete:
            raise StoreError(
                f"{path} is incomplete (extraction not finished: {st.n_committed()}/{st.n_chunks} chunks); "
                "re-run the same `usae extract` command to finish it"
            )
        return st

    # ------------------------------------------------------------ properties
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def image_source(self) -> dict | None:
        """Where the images were read from ({manifest, manifest_abs, image_root, image_root_abs},
        recorded by `usae extract`); None for stores without the record (synth, older stores)."""
        rec = self.attrs.get("image_source")
        return dict(rec) if rec else None

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.chunk_images)

    @property
    def n_rows(self) -> int:
        return self.n_images * self.tokens_per_image

    @property
    def image_ids(self) -> np.ndarray:
        if self._image_ids is None:
            self._image_ids = (
                np.asarray(self._root["image_id"][:], dtype=object)
                if self.n_images
                else np.zeros(0, object)
            )
        return self._image_ids

    @property
    def valid(self) -> np.ndarray:
        return np.asarray(self._valid_arr[:], dtype=bool) if self.n_images else np.zeros(0, bool)

    @property
    def split(self) -> np.ndarray | None:
        if "split" not in self._root:
            return None
        return np.asarray(self._root["split"][:], dtype=object)

    @property
    def labels(self) -> np.ndarray | None:
        """(N,) str label of each image ("" = unlabelled), or None when the store has none."""
        if "label" not in self._root:
            return None
        return np.asarray(self._root["label"][:], dtype=object)

    @property
    def failures(self) -> list[dict]:
        return list(self.attrs.get("failures", []))

    def spec(self, key: str) -> dict:
        return dict(self._groups[key].attrs.get("spec", {}))

    def stats(self, key: str) -> dict:
        """Exact statistics of a backbone (count, mean[d], m2[d], scalar_mean, scalar_std)."""
        s = self._groups[key].attrs.get("stats")
        if s is None:
            raise StoreError(f"{self.path}: backbone {key!r} has no statistics (store incomplete?)")
        return dict(s)

    def is_int8(self, key: str) -> bool:
        """Whether a backbone's tokens are int8 codes (dequantised with `scales`)."""
        return self.dtypes[key] == np.int8

    @property
    def store_dtype(self) -> str:
        """ "int8" when every backbone is stored as int8 codes, else "float16"."""
        return (
            "int8" if self.backbones and all(self.is_int8(k) for k in self.backbones) else "float16"
        )

    def scales(self, key: str) -> np.ndarray:
        """(n_chunks, width) float32 scales of an int8 backbone (chunk c's row = code * scales[c]);
        zeros for a chunk never written. Read once, then cached."""
        if not self.is_int8(key):
            raise StoreError(
                f"backbone {key!r} of {self.path} is stored as {self.dtypes[key]}, it has no scales"
            )
        if key not in self._scales:
            d, arr = self.widths[key], self._groups[key]["scale"]
            if chunk_files.is_raw(arr):
                out = np.zeros((self.n_chunks, d), np.float32)
                base = os.path.join(self.path, "backbones", key, "scale", "c")
                for i in range(self.n_chunks):
                    fd, size = chunk_files.open_file(os.path.join(base, str(i), "0"))
                    if fd is None:
                        continue
                    if size < 4 * d:
                        os.close(fd)
                        raise StoreError(
                            f"scale file of chunk {i} of {key!r} in {self.path} is truncated"
                        )
                    chunk_files.read_into(fd, out[i], 4 * d)
            else:
                out = np.asarray(arr[:], np.float32)
            self._scales[key] = out
        return self._scales[key]

    def token_rows(self, key: str) -> int:
        """Rows of a backbone's token array (n_images * tokens_per_image in a sound store)."""
        return int(self._groups[key]["tokens"].shape[0])

    def chunk_images_range(self, i: int) -> tuple[int, int]:
        a = i * self.chunk_images
        return a, min(a + self.chunk_images, self.n_images)

    def chunk_rows(self, i: int) -> tuple[int, int]:
        a, b = self.chunk_images_range(i)
        return a * self.tokens_per_image, b * self.tokens_per_image

    # ------------------------------------------------------------ reading
    def chunk_file(self, key: str, i: int) -> Path:
        """The file of chunk i of one backbone's token array (absent when never written)."""
        return Path(self._chunk_path(key, i))

    def _chunk_path(self, key: str, i: int) -> str:
        return os.path.join(self._chunk_dirs[key], str(i), "0")

    def read_chunk(
        self, key: str, i: int, out: np.ndarray | None = None, *, codes: bool = False
    ) -> np.ndarray:
        """Token rows of chunk i of one backbone (rows, d); direct file read when raw.

        float16 for a float16 store; for an int8 store, the dequantised rows in float32, or with
        ``codes=True`` the int8 codes as stored (scale them with ``scales(key)[i]``)."""
        if self.is_int8(key) and not codes:
            q = self.read_chunk(key, i, codes=True)
            return dequantize_int8(q, self.scales(key)[i], out=out)
        r0, r1 = self.chunk_rows(i)
        d = self.widths[key]
        rows = r1 - r0
        if self._direct[key]:
            if out is None:
                out = np.empty((rows, d), dtype=self.dtypes[key])
            fd, nbytes = self._open_raw(key, i)  # checked to hold the chunk's rows
            if fd is None:  # never written: zarr's fill value
                out[:] = 0
                return out
            got = chunk_files.read_into(fd, out, nbytes)
            if got != nbytes:  # cut while being read
                raise StoreError(
                    f"chunk file {self.chunk_file(key, i)} is truncated ({got} of {nbytes} bytes)"
                )
            return out
        arr = self._groups[key]["tokens"][r0:r1]
        if out is not None:
            out[:] = arr
            return out
        return np.asarray(arr)

    def read_chunk_rows(self, key: str, i: int, rows: np.ndarray) -> np.ndarray:
        """Some rows of chunk i of one backbone (`rows`: offsets inside the chunk), as
        ``read_chunk(key, i)[rows]`` (int8 dequantised). A raw array is memory-mapped, so only
        the pages of those rows are read."""
        if not self._direct[key]:
            return self.read_chunk(key, i)[rows]
        x = self.map_chunk(key, i)[rows]
        return dequantize_int8(x, self.scales(key)[i]) if self.is_int8(key) else x

    def open_chunk(self, key: str, i: int) -> int | None:
        """A read-only file descriptor of chunk i's file of one backbone (raw arrays only), for
        reading parts of it with ``os.preadv``; None when the chunk was never written (zeros).
        The caller closes it. The file is checked to hold the chunk's rows, and unless they are
        in the page cache already, the OS is told they will be read (POSIX_FADV_WILLNEED starts
        read-ahead now; on cached files it only slows concurrent reads of them).
        """
        fd, nbytes = self._open_raw(key, i)
        if fd is not None:
            chunk_files.advise_willneed(fd, nbytes)
        return fd

    def map_chunk(self, key: str, i: int) -> np.ndarray:
        """Token rows of chunk i of one backbone as a read-only (rows, d) array (float16, or the
        int8 codes of an int8 store) over the
        chunk file's pages (raw arrays only): no copy, nothing allocated; the file is unmapped
        when the last reference to the array goes. Unless the file is in the page cache, the OS
        is told the pages will be needed (MADV_WILLNEED: read-ahead starts now); they are mapped
        on first touch (cheaper than MAP_POPULATE for cached files: the kernel maps pages around
        each fault in one go).
        """
        fd, nbytes = self._open_raw(key, i)
        d, dt = self.widths[key], self.dtypes[key]
        if fd is None:  # never written: zarr's fill value
            return np.broadcast_to(np.zeros((1, d), dt), (nbytes // (dt.itemsize * d), d))
        return chunk_files.map_rows(fd, nbytes, d, dt)

    def _open_raw(self, key: str, i: int) -> tuple[int | None, int]:
        """(read-only descriptor of chunk i's file of one backbone, or None when never written;
        bytes of the chunk's rows), for raw arrays only. A file too short for the rows is an
        error here: reading it in parts would come up short, mapping it would crash the reader
        (SIGBUS) instead of raising."""
        if not self._direct[key]:
            raise StoreError(
                f"backbone {key!r} of {self.path} is not stored raw: read its chunks with read_chunk"
            )
        r0, r1 = self.chunk_rows(i)
        nbytes, f = (
            (r1 - r0) * self.widths[key] * self.dtypes[key].itemsize,
            self._chunk_path(key, i),
        )
        fd, size = chunk_files.open_file(f)
        if fd is not None and size < nbytes:
            os.close(fd)
            raise StoreError(f"chunk file {f} is truncated ({size} of {nbytes} bytes)")
        return fd, nbytes

    def read_rows(self, key: str, r0: int, r1: int) -> np.ndarray:
        """Contiguous rows through zarr (for small reads and tests, not for loaders); an int8
        store's rows dequantised (float32)."""
        rows = np.asarray(self._groups[key]["tokens"][r0:r1])
        if not self.is_int8(key):
            return rows
        rpc = self.chunk_images * self.tokens_per_image
        chunk = np.arange(r0, r0 + len(rows)) // rpc
        return rows.astype(np.float32) * self.scales(key)[chunk]

    def read_prefix(self, key: str, i0: int, i1: int) -> np.ndarray | None:
        if not self.prefix_tokens[key]:
            return None
        return np.asarray(self._groups[key]["prefix"][i0:i1])

    # ------------------------------------------------------------ writing (one writer per chunk)
    def _marker(self, i: int) -> Path:
        return self.path / _META / "commits" / f"c{i}.json"

    def is_committed(self, i: int) -> bool:
        return self._marker(i).exists()

    def committed_chunks(self) -> set[int]:
        d = self.path / _META / "commits"
        if not d.exists():
            return set()
        return {int(p.stem[1:]) for p in d.glob("c*.json")}

    def n_committed(self) -> int:
        return len(self.committed_chunks())

    def write_chunk(
        self,
        i: int,
        tokens: Mapping[str, np.ndarray],
        valid: np.ndarray,
        *,
        prefix: Mapping[str, np.ndarray] | None = None,
        failures: Sequence[Mapping[str, str]] = (),
        stats: Mapping[str, RunningStats] | None = None,
    ) -> None:
        """Write chunk i of every backbone, then its commit marker (the chunk's only writer).

        `stats` (per backbone, over the chunk's valid rows) may be given by a caller that has
        them already, e.g. summed on the GPU beside the forward pass; otherwise they are
        computed here in float64, which costs more CPU time than the write itself.
        """
        if self.complete:
            raise StoreError(f"{self.path} is complete and immutable")
        a, b = self.chunk_images_range(i)
        r0, r1 = self.chunk_rows(i)
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (b - a,):
            raise ValueError(f"valid mask has shape {valid.shape}, chunk {i} holds {b - a} images")
        out_stats = {}
        rows_valid = None if valid.all() else np.repeat(valid, self.tokens_per_image)
        for key in self.backbones:
            x = np.asarray(tokens[key])
            if x.shape != (r1 - r0, self.widths[key]):
                raise ValueError(
                    f"{key}: chunk {i} expects shape {(r1 - r0, self.widths[key])}, got {x.shape}"
                )
            x16 = np.ascontiguousarray(x, dtype=np.float16)
            if self.is_int8(key):  # statistics below are of x16, the unquantised rows
                q, scale = quantize_int8(x16)
                self._write_scale(key, i, scale)
                self._write_tokens(key, i, q)
            else:
                self._write_tokens(key, i, x16)
            if stats is not None:
                rs = stats[key]
            else:
                rs = RunningStats.of(x16 if rows_valid is None else x16[rows_valid])
            out_stats[key] = rs.to_json()
            if self.prefix_tokens[key]:
                p = (prefix or {}).get(key)
                if p is not None:
                    self._groups[key]["prefix"][a:b] = np.asarray(p).astype(np.float16)
        self._write_valid(i, valid)
        marker = {
            "chunk": i,
            "n_images": b - a,
            "n_valid": int(valid.sum()),
            "failures": [dict(f) for f in failures],
            "stats": out_stats,
        }
        atomic_write_json(self._marker(i), marker)

    def _write_scale(self, key: str, i: int, scale: np.ndarray) -> None:
        """Chunk i's scale row of an int8 backbone (before its codes and its marker)."""
        arr = self._groups[key]["scale"]
        if not chunk_files.is_raw(arr):
            arr[i : i + 1] = scale[None]
            return
        f = Path(self.path, "backbones", key, "scale", "c", str(i), "0")
        f.parent.mkdir(parents=True, exist_ok=True)
        chunk_files.write_padded(f, np.ascontiguousarray(scale, np.float32), scale.size * 4)
        self._scales.pop(key, None)

    def _write_tokens(self, key: str, i: int, x16: np.ndarray) -> None:
        """Chunk i of a backbone's tokens: the chunk file itself when the array is raw.

        A raw (uncompressed, little-endian) zarr v3 chunk is exactly the array's bytes, the
        edge chunk padded to the full chunk shape; writing it directly skips zarr's per-chunk
        machinery (the mirror of `read_chunk`). Written to a temporary name and renamed, so a
        killed writer never leaves a half chunk under the real name.
        """
        if not self._direct[key]:
            r0, r1 = self.chunk_rows(i)
            self._groups[key]["tokens"][r0:r1] = x16
            return
        f = self.chunk_file(key, i)
        f.parent.mkdir(parents=True, exist_ok=True)
        full_bytes = self.chunk_images * self.tokens_per_image * x16.shape[1] * x16.itemsize
        chunk_files.write_padded(f, x16, full_bytes)

    def _write_valid(self, i: int, valid: np.ndarray) -> None:
        """Chunk i of the validity mask (one byte per image), directly when the array is raw."""
        a, b = self.chunk_images_range(i)
        if not self._valid_direct:
            self._valid_arr[a:b] = valid
            return
        f = self.path / "valid" / "c" / str(i)
        f.parent.mkdir(parents=True, exist_ok=True)
        data = valid.astype(np.uint8).tobytes() + bytes(
            self.chunk_images - (b - a)
        )  # edge chunk padded
        atomic_write(f, data)

    def finalize(self) -> None:
        """Merge the commit markers into statistics and failures; mark the store complete."""
        missing = sorted(set(range(self.n_chunks)) - self.committed_chunks())
        if missing:
            raise StoreError(
                f"cannot finalize {self.path}: {len(missing)} chunks uncommitted (first: {missing[:5]})"
            )
        merged = {k: RunningStats.empty(self.widths[k]) for k in self.backbones}
        failures: list[dict] = []
        for i in range(self.n_chunks):
            with open(self._marker(i)) as f:
                m = json.load(f)
            failures.extend(m["failures"])
            for k in self.backbones:
                merged[k] = merged[k].merge(RunningStats.from_json(m["stats"][k]))
        for k in self.backbones:
            mu, sd = merged[k].scalar()
            self._groups[k].attrs["stats"] = {
                **merged[k].to_json(),
                "scalar_mean": mu,
                "scalar_std": sd,
            }
        self._root.attrs.update({"failures": failures, "complete": True})
        self.attrs = dict(self._root.attrs)

    def summary(self) -> dict:
        """Plain-data description (what `usae info` prints)."""
        out = {
            "path": str(self.path),
            "source": self.attrs.get("source"),
            "complete": self.complete,
            "n_images": self.n_images,
            "n_valid": int(self.valid.sum()),
            "tokens_per_image": self.tokens_per_image,
            "grid": list(self.grid),
            "chunk_images": self.chunk_images,
            "chunks_committed": f"{self.n_committed()}/{self.n_chunks}",
            "failures": len(self.failures),
            "backbones": {},
        }
        for k in self.backbones:
            s = self._groups[k].attrs.get("stats")
            out["backbones"][k] = {
                "width": self.widths[k],
                "dtype": str(self.dtypes[k]),
                "rows": self.n_rows,
                "prefix_tokens": self.prefix_tokens[k],
                "spec": self.spec(k),
                "scalar_mean": None if s is None else s["scalar_mean"],
                "scalar_std": None if s is None else s["scalar_std"],
            }
        return out


def convert_store(
    src: str | os.PathLike, dst: str | os.PathLike, store_dtype: str = "int8"
) -> Store:
    """Copy a complete store into a new one holding `store_dtype` tokens: the same images,
    chunks, attributes and ground truth, each chunk re-encoded from the source's rows (an
    int8 source is dequantised first). The statistics are the source's, carried over from its
    commit markers (for a float16 source: those of the unquantised rows)."""
    import shutil

    s = Store.open(src)
    layouts = [BackboneLayout(k, s.widths[k], s.prefix_tokens[k], s.spec(k)) for k in s.backbones]
    a = s.attrs
    out = Store.create(
        dst, list(s.image_ids), layouts, grid=tuple(a["grid"]), chunk_images=s.chunk_images,
        source=a["source"], fingerprint_of={"converted_from": a["fingerprint"]},
        manifest_sha256=a.get("manifest_sha256", ""), split=None if s.split is None else list(s.split),
        extra=dict(a.get("extra", {})), store_dtype=store_dtype, image_source=s.image_source,
        labels=None if s.labels is None else list(s.labels),
    )  # fmt: skip
    valid = s.valid
    for i in range(s.n_chunks):
        if out.is_committed(i):
            continue
        with open(s._marker(i)) as f:
            m = json.load(f)
        ia, ib = s.chunk_images_range(i)
        tokens = {k: s.read_chunk(k, i) for k in s.backbones}
        prefix = {k: s.read_prefix(k, ia, ib) for k in s.backbones if s.prefix_tokens[k]}
        stats = {k: RunningStats.from_json(m["stats"][k]) for k in s.backbones}
        out.write_chunk(i, tokens, valid[ia:ib], prefix=prefix, failures=m["failures"], stats=stats)
    truth = s.path / _META / "truth.safetensors"
    if truth.exists():
        shutil.copyfile(truth, out.path / _META / "truth.safetensors")
    out.finalize()
    return out
