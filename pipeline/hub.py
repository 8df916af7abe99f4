"""A backbone's pretrained weights from the Hugging Face hub, through `huggingface_hub`, into
the standard HF cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``).

Where a backbone's weights live is what timm and open_clip say: timm's pretrained config
``hf_hub_id`` (e.g. ``timm/vit_small_patch14_dinov2.lvd142m``, an optional ``@revision``),
file ``model.safetensors`` else ``pytorch_model.bin``; open_clip's ``hf_hub`` entry, file
``open_clip_model.safetensors`` else ``open_clip_pytorch_model.bin``. A file in the cache is
found by `cached_weights` without any network access (and a file timm/open_clip downloaded
into the torch hub cache from a plain URL is found too).

`fetch_weights` = the cache, else a download:
- one HEAD request (`huggingface_hub.get_hf_file_metadata`, no retry loop, a short timeout:
  `HF_HUB_ETAG_TIMEOUT` when set, else `METADATA_TIMEOUT` s) gives the commit, the sha256
  (the hub's LFS etag) and the size; no network, a refused or timed-out connection or a hub
  error is a `WeightsUnavailable` at once, naming the ways out;
- the body comes with `huggingface_hub.file_download.http_get` (its progress bar, its
  ``Range`` retries when the connection drops mid-file, `HF_HUB_DOWNLOAD_TIMEOUT`) into
  ``blobs/<sha256>.incomplete``, which is KEPT when the process dies or the call fails, so the
  next call resumes from it (huggingface_hub 2.x itself deletes its partial files);
- the file must have the size and sha256 the hub recorded and be a readable safetensors / safe
  torch state dict, else it is deleted and refused: nothing of it enters the cache;
- then it is placed in the cache layout huggingface_hub itself reads and writes
  (``blobs/<sha256>``, ``snapshots/<commit>/<file>`` -> the blob, ``refs/<revision>``), so
  ``hf_hub_download``, timm and open_clip find it there too.
`HF_HUB_OFFLINE=1` (or ``offline=True``) never touches the network. `HF_ENDPOINT` (a mirror)
and `HF_TOKEN` (gated repos) are honoured as huggingface_hub honours them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from usae.pipeline.weights import WeightsUnavailable

from usae.runtime import atomic_path, atomic_write

if TYPE_CHECKING:
    from usae.pipeline.registry import BackboneSpec

METADATA_TIMEOUT = 5.0
"""Seconds the HEAD request may take (unless `HF_HUB_ETAG_TIMEOUT` is set)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class HubSource:
    """Where a backbone's weights live on the hub (as timm / open_clip locate them)."""

    repo_id: str
    revision: str
    """Branch, tag or commit asked for ("main" unless the library pins one)."""
    files: tuple[str, ...]
    """Candidate file names, preferred first (safetensors before pickles)."""
    url: str | None = None
    """The library's plain download URL, if any (only looked up in the torch hub cache)."""


@dataclass(frozen=True)
class WeightsFile:
    """A pretrained weights file on disk and where it came from (recorded in the store)."""

    path: Path
    origin: str
    """"hf-hub" (the HF cache) or "torch-hub" (a file timm/open_clip fetched by URL)."""
    repo_id: str | None
    revision: str | None
    """Commit hash of the snapshot the file belongs to (None outside the HF cache)."""
    filename: str
    size: int
    sha256: str
    downloaded: bool = False
    """True when this call downloaded it (False: it was already in the cache)."""

    def record(self) -> dict[str, Any]:
        """What the store records about the file (no local path: stores move between machines)."""
        d = asdict(self)
        del d["path"], d["downloaded"]
        return d


# ---------------------------------------------------------------- where weights live
def hub_source(spec: BackboneSpec) -> HubSource | None:
    """The hub repo, revision and candidate files of the spec's pretrained weights, or None."""
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name)
        if cfg is None:
            return None
        hub_id = (cfg.hf_hub_id or "").strip("/")
        fname = getattr(cfg, "hf_hub_filename", None)
        files = (*_safe_alternatives(fname), fname) if fname else _TIMM_FILES
        url = cfg.url or None
    elif spec.source == "open_clip":
        import open_clip

        model, _, tag = spec.name.partition("/")
        pcfg = dict(open_clip.get_pretrained_cfg(model, tag) or {}) if tag else {}
        hub_id, fname = os.path.split(pcfg.get("hf_hub") or "")
        hub_id = hub_id.strip("/")
        files = (*_safe_alternatives(fname), fname) if fname else _OPEN_CLIP_FILES
        url = pcfg.get("url") or None
    else:
        return None
    if not hub_id and not url:
        return None
    repo, _, rev = hub_id.partition("@")
    return HubSource(repo, rev or "main", tuple(dict.fromkeys(files)), url)


def _safe_alternatives(fname: str) -> tuple[str, ...]:
    if fname in ("pytorch_model.bin",):
        return ("model.safetensors",)
    if fname == "open_clip_pytorch_model.bin":
        return ("open_clip_model.safetensors",)
    if fname.endswith((".bin", ".pth")):
        return (fname[:-4] + ".safetensors",)
    return ()


def hub_cache_dir() -> Path:
    """The HF hub cache in use (`HF_HUB_CACHE`, or `HF_HOME`/hub, as huggingface_hub reads them)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def is_offline(offline: bool | None = None) -> bool:
    """`offline`, or when None: `HF_HUB_OFFLINE` (read now and as huggingface_hub read it)."""
    if offline is not None:
        return bool(offline)
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _storage(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


# ---------------------------------------------------------------- the cache (no network)
def cached_weights(spec: BackboneSpec, *, verify: bool = True) -> WeightsFile | None:
    """The spec's weights in the LOCAL cache (HF hub, else torch hub), or None. No network.

    verify: hash the file and refuse (`WeightsUnavailable`) a blob whose content is not the
    sha256 it is stored under (a file damaged on disk). Without it the blob name is trusted.
    """
    from huggingface_hub import try_to_load_from_cache

    src = hub_source(spec)
    if src is None:
        return None
    if src.repo_id:
        for fname in src.files:
            hit = try_to_load_from_cache(
                src.repo_id, fname, cache_dir=hub_cache_dir(), revision=src.revision
            )
            if isinstance(hit, str) and os.path.isfile(hit):
                return _cached_file(Path(hit), src.repo_id, fname, verify)
    if src.url:
        import torch

        f = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(src.url)
        if f.is_file() and f.suffix in (".safetensors", ".pth", ".bin", ".pt"):
            return WeightsFile(f, "torch-hub", None, None, f.name, f.stat().st_size, file_sha256(f))
    return None


def _cached_file(path: Path, repo_id: str, fname: str, verify: bool) -> WeightsFile:
    blob = Path(os.path.realpath(path))
    named = blob.name if _SHA256.fullmatch(blob.name) else None
    sha = file_sha256(blob) if (verify or named is None) else named
    if named is not None and sha != named:
        raise WeightsUnavailable(
            f"the cached weights {path} are damaged: their sha256 is {sha[:16]}…, the hub's is "
            f"{named[:16]}…; delete {blob} and fetch again (usae weights fetch)"
        )
    # .../snapshots/<commit>/<fname>: the commit the file was resolved at
    commit = path.parents[len(Path(fname).parts) - 1].name
    return WeightsFile(path, "hf-hub", repo_id, commit, fname, blob.stat().st_size, sha)


# ---------------------------------------------------------------- fetching
def fetch_weights(
    spec: BackboneSpec,
    *,
    offline: bool | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> WeightsFile:
    """The spec's weights: from the cache, else downloaded from the hub into it.

    Raises `WeightsUnavailable` naming the ways out when offline and not cached, when the hub
    can't be reached (within `timeout` s, default `HF_HUB_ETAG_TIMEOUT` or `METADATA_TIMEOUT`),
    when it has no weights for the model, or when the downloaded file is corrupt.
    """
    hit = cached_weights(spec)
    if hit is not None:
        return hit
    src = hub_source(spec)
    if src is None or not src.repo_id:
        raise WeightsUnavailable(
            missing_weights_message(spec, "timm/open_clip name no hub repo for it")
        )
    if is_offline(offline):
        raise WeightsUnavailable(
            missing_weights_message(
                spec,
                "not in the local cache, and offline (HF_HUB_OFFLINE is set, or offline asked)",
            )
        )
    return _download(spec, src, timeout, progress)


def missing_weights_message(spec: BackboneSpec, why: str = "not in the local cache") -> str:
    return (
        f"no weights for backbone {spec.key!r} ({spec.source}:{spec.name}): {why}. Either run "
        f"`usae weights fetch {spec.key}` on a machine with network (it fills the HF cache, "
        f"{hub_cache_dir()}; set HF_HUB_CACHE to share it), pass --weights {spec.key}=FILE "
        f"(a .safetensors or state-dict .pt/.pth file) or --random-init (random weights, for "
        f"testing the pipeline only)."
    )


def _metadata_timeout(timeout: float | None) -> float:
    from huggingface_hub import constants

    if timeout is not None:
        return float(timeout)
    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:
        return float(constants.HF_HUB_ETAG_TIMEOUT)
    return METADATA_TIMEOUT


def _head(spec: BackboneSpec, src: HubSource, timeout: float):
    """(file name, metadata, url) of the first candidate file the hub has."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    for fname in src.files:
        url = hf_hub_url(src.repo_id, fname, revision=src.revision)
        try:
            meta = get_hf_file_metadata(url, timeout=timeout, retry_on_errors=False)
        except EntryNotFoundError:
            continue
        except OfflineModeIsEnabled:
            raise WeightsUnavailable(
                missing_weights_message(
                    spec,
                    "not in the local cache, and offline (HF_HUB_OFFLINE is set, or offline asked)",
                )
            ) from None
        except RevisionNotFoundError:
            raise WeightsUnavailable(
                missing_weights_message(
                    spec, f"the hub repo {src.repo_id} has no revision {src.revision!r}"
                )
            ) from None
        except (HfHubHTTPError, FileMetadataError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = (
                " (a gated or private repo needs a token: HF_TOKEN or `hf auth login`)"
                if status in (401, 403) or isinstance(e, (RepositoryNotFoundError, GatedRepoError))
                else ""
            )
            raise WeightsUnavailable(
                missing_weights_message(
                    spec,
                    f"the hub refused {src.repo_id}/{fname}: {type(e).__name__}: {first}{hint}",
                )
            ) from None
        except (httpx2.HTTPError, OSError) as e:
            raise WeightsUnavailable(
                missing_weights_message(
                    spec,
                    f"not in the local cache, and the hub {constants.ENDPOINT} can't be reached "
                    f"({type(e).__name__}: {str(e)[:120]})",
                )
            ) from None
        if meta.commit_hash is None or meta.etag is None:
            raise WeightsUnavailable(
                missing_weights_message(
                    spec, f"{constants.ENDPOINT} answered without a commit or etag: not a hub?"
                )
            )
        return fname, meta, url
    raise WeightsUnavailable(
        missing_weights_message(spec, f"the hub repo {src.repo_id} has none of {list(src.files)}")
    )


def _download(
    spec: BackboneSpec, src: HubSource, timeout: float | None, progress: bool
) -> WeightsFile:
    from huggingface_hub.utils import WeakFileLock

    fname, meta, url = _head(spec, src, _metadata_timeout(timeout))
    etag, commit, size = meta.etag, meta.commit_hash, meta.size
    if not re.fullmatch(r"[0-9A-Za-z._-]+", etag) or not _COMMIT.fullmatch(commit):
        raise WeightsUnavailable(
            f"the hub answered an unusable etag {etag!r} / commit {commit!r} for {src.repo_id}/{fname}"
        )
    expect_sha = etag if _SHA256.fullmatch(etag) else None  # LFS files: the etag is the sha256
    storage = _storage(src.repo_id)
    blob = storage / "blobs" / etag
    pointer = storage / "snapshots" / commit / fname
    lock = hub_cache_dir() / ".locks" / storage.name / f"{etag}.usae.lock"
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    downloaded = False
    with WeakFileLock(str(lock)):
        if not blob.is_file():
            _download_blob(url, meta, blob, fname, expect_sha, size, progress, src.repo_id)
            downloaded = True
        _link(blob, pointer)
        if src.revision != commit:
            ref = storage / "refs" / src.revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(ref, commit)
    sha = expect_sha or file_sha256(blob)
    return WeightsFile(
        pointer, "hf-hub", src.repo_id, commit, fname, blob.stat().st_size, sha, downloaded
    )


def _download_blob(
    url: str, meta, blob: Path, fname: str, expect_sha: str | None, size: int | None,
    progress: bool, repo_id: str,
) -> None:  # fmt: skip
    """GET the file into blob.incomplete (resuming what is there), check it, move it to blob."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = blob.with_name(blob.name + ".incomplete")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # longer than the file: not a prefix of it
        part.unlink()
        have = 0
    headers = build_hf_headers()
    target = url
    if meta.xet_file_data is None and meta.location and meta.location != url:
        target = meta.location  # a CDN redirect: go there directly, without the token
        if _origin(target) != _origin(url):
            headers.pop("authorization", None)
    tqdm_class = None
    if not progress:
        from tqdm.auto import tqdm

        class _Quiet(tqdm):
            def __init__(self, *a, **k):
                super().__init__(*a, **{**k, "disable": True})

        tqdm_class = _Quiet
    try:
        with open(part, "ab") as f:
            http_get(
                target, f, resume_size=have, headers=headers, expected_size=size,
                displayed_filename=fname, tqdm_class=tqdm_class,
            )  # fmt: skip
    except (httpx2.HTTPError, HfHubHTTPError, OSError) as e:
        kept = part.stat().st_size if part.exists() else 0
        raise WeightsUnavailable(
            f"downloading {repo_id}/{fname} stopped after {kept} of {size or '?'} bytes "
            f"({type(e).__name__}: {str(e).strip()[:160]}); run the same command again to "
            f"resume from {part}"
        ) from None
    problem = _check_file(part, fname, expect_sha, size)
    if problem:
        part.unlink(missing_ok=True)
        raise WeightsUnavailable(
            f"refused the download of {repo_id}/{fname}: {problem}; nothing was kept "
            f"(try again; if it persists the hub's file or a proxy is at fault)"
        )
    os.chmod(part, 0o644)
    os.replace(part, blob)


def _origin(url: str) -> tuple:
    u = urlsplit(url)
    return (
        u.scheme,
        (u.hostname or "").lower(),
        u.port or {"http": 80, "https": 443}.get(u.scheme),
    )


def _check_file(path: Path, fname: str, expect_sha: str | None, size: int | None) -> str | None:
    """Why the downloaded file is unusable, or None."""
    n = path.stat().st_size
    if size is not None and n != size:
        return f"{n} bytes where the hub records {size}"
    if expect_sha is not None:
        sha = file_sha256(path)
        if sha != expect_sha:
            return f"its sha256 is {sha}, the hub records {expect_sha}"
    try:
        if fname.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        else:
            import torch

            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is refused the same way
        return f"it is not a readable {'safetensors' if fname.endswith('.safetensors') else 'state-dict'} file ({type(e).__name__}: {str(e)[:120]})"
    return None


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag> (a copy where symlinks can't be made)."""
    if pointer.exists():
        return
    pointer.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(pointer) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
