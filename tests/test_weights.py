"""Weights from the hub (`usae.pipeline.hub`), against a real HTTP server on 127.0.0.1 that
serves the hub's layout (tests/hubserver.py): fetch, cache hit, resume after a cut connection,
corrupt and mismatched files refused, offline and unreachable hubs failing in seconds,
`usae weights fetch/list`, and extraction with downloaded weights = the same weights as a file.

The served files are state dicts of the TINY random-init models, under the real repo ids, so
`load_backbone(spec, tiny=True)` loads them."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from hubserver import FakeHub, blackhole, closed_port_url, point_hub_at
from safetensors.torch import save
from typer.testing import CliRunner
from usae.pipeline.backbone import load_backbone
from usae.pipeline.cli import register_weights
from usae.pipeline.extract import ExtractConfig, run_extract
from usae.pipeline.hub import cached_weights, fetch_weights, hub_source
from usae.pipeline.registry import resolve
from usae.pipeline.store import Store
from usae.pipeline.weights import WeightsUnavailable
from usae.pipeline.weights_cmd import WeightsListConfig, run_weights_list

from usae.errors import USER_ERROR_EXIT

torch.set_num_threads(1)
CHUNK = 64 * 1024
pytestmark = pytest.mark.timeout(120)


def tiny_state_bytes(key: str, seed: int) -> bytes:
    """The tiny random-init model's state dict as a safetensors file (bytes)."""
    bb = load_backbone(resolve(key), tiny=True, random_init=True, seed=seed)
    return save({k: v.contiguous() for k, v in bb.model.state_dict().items()})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A started FakeHub serving tiny dinov2 and vit weights; huggingface_hub pointed at it,
    with an empty cache under tmp_path."""
    h = FakeHub().start()
    for key, seed in (("dinov2", 1), ("vit", 2)):
        h.add(hub_source(resolve(key)).repo_id, "model.safetensors", tiny_state_bytes(key, seed))
    point_hub_at(monkeypatch, h.url, tmp_path / "hf" / "hub")
    # huggingface_hub writes (and so resumes from) whole chunks of DOWNLOAD_CHUNK_SIZE (10 MB):
    # smaller ones here, for files of a tiny model
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", CHUNK)
    try:
        yield h
    finally:
        h.stop()


def _repo(key: str) -> str:
    return hub_source(resolve(key)).repo_id


def _cache_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()
    )


# ---------------------------------------------------------------- fetch, cache hit
def test_fetch_then_cache_hit_in_the_hf_cache_layout(hub, tmp_path) -> None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    spec = resolve("dinov2")
    served = hub.repos[_repo("dinov2")]
    f = served.files["model.safetensors"]
    got = fetch_weights(spec, progress=False)
    assert got.downloaded and got.origin == "hf-hub" and got.repo_id == _repo("dinov2")
    assert got.revision == served.commit and got.filename == "model.safetensors"
    assert got.sha256 == hashlib.sha256(f.data).hexdigest() and got.size == len(f.data)
    assert got.path.read_bytes() == f.data
    assert got.path == tmp_path / "hf/hub/models--timm--vit_small_patch14_dinov2.lvd142m" / (
        f"snapshots/{served.commit}/model.safetensors"
    )
    assert len(hub.requests("HEAD")) == 1 and len(hub.requests("GET", "/cdn/")) == 1

    n = len(hub.log)
    again = fetch_weights(spec, progress=False)  # cache hit: no request at all
    assert not again.downloaded and again.path == got.path and again.sha256 == got.sha256
    assert len(hub.log) == n
    # huggingface_hub (hence timm / open_clip) finds the same file: its cache layout
    assert try_to_load_from_cache(_repo("dinov2"), "model.safetensors") == str(got.path)
    assert hf_hub_download(_repo("dinov2"), "model.safetensors") == str(got.path)
    assert not hub.requests("GET", "/cdn/")[1:], "hf_hub_download downloaded it again"


def test_load_backbone_records_repo_revision_and_sha256(hub, tmp_path) -> None:
    spec = resolve("dinov2")
    bb = load_backbone(spec, tiny=True)
    ref = load_backbone(spec, tiny=True, random_init=True, seed=1)  # the served state
    assert bb.identity["sha256"] == ref.identity["sha256"] and not bb.identity["random_init"]
    f = bb.identity["file"]
    data = hub.repos[_repo("dinov2")].files["model.safetensors"].data
    assert f == {
        "origin": "hf-hub", "repo_id": _repo("dinov2"), "revision": hub.repos[_repo("dinov2")].commit,
        "filename": "model.safetensors", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
    }  # fmt: skip
    json.dumps(bb.identity)  # stored as JSON
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(bb(x).patch_btd, ref(x).patch_btd, rtol=0, atol=0)


# ---------------------------------------------------------------- resume
def _kept(data: bytes) -> int:
    """Bytes kept of a transfer cut half-way: the whole chunks received."""
    return len(data) // 2 // CHUNK * CHUNK


def test_cut_connection_resumes_with_a_range_request(hub) -> None:
    data = hub.repos[_repo("vit")].files["model.safetensors"].data
    hub.cut_next = 1
    got = fetch_weights(resolve("vit"), progress=False)
    gets = hub.requests("GET", "/cdn/")
    assert len(gets) == 2 and gets[0][2] is None
    assert gets[1][2] == f"bytes={_kept(data)}-", gets  # the second GET asks for the rest only
    assert got.path.read_bytes() == data


def test_interrupted_download_resumes_in_the_next_call(hub, tmp_path) -> None:
    data = hub.repos[_repo("vit")].files["model.safetensors"].data
    sha = hashlib.sha256(data).hexdigest()
    hub.cut_next, hub.fail_next = 1, 1  # half the file, then the hub fails the retry
    with pytest.raises(WeightsUnavailable, match="resume"):
        fetch_weights(resolve("vit"), progress=False)
    blobs = tmp_path / "hf/hub/models--timm--vit_base_patch16_224.augreg2_in21k_ft_in1k/blobs"
    part = blobs / f"{sha}.incomplete"
    assert part.stat().st_size == _kept(data) > 0 and not (blobs / sha).exists()
    assert cached_weights(resolve("vit")) is None  # a partial file is not weights

    got = fetch_weights(resolve("vit"), progress=False)
    last = hub.requests("GET", "/cdn/")[-1]
    assert last[2] == f"bytes={_kept(data)}-"
    assert got.path.read_bytes() == data and not part.exists() and got.sha256 == sha


# ---------------------------------------------------------------- refused files
def _nothing_cached(tmp_path: Path, repo: str) -> None:
    folder = tmp_path / "hf/hub" / ("models--" + repo.replace("/", "--"))
    left = [p for p in _cache_files(folder) if not p.startswith("refs")] if folder.exists() else []
    assert left == [], left


def test_file_differing_from_the_hubs_sha256_is_refused_and_not_kept(hub, tmp_path) -> None:
    repo = _repo("dinov2")
    good = hub.repos[repo].files["model.safetensors"].data
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, one byte flipped: as a bad proxy or disk would
    hub.add(
        repo, "model.safetensors", bytes(bad), advertised_sha256=hashlib.sha256(good).hexdigest()
    )
    with pytest.raises(WeightsUnavailable, match="sha256") as e:
        fetch_weights(resolve("dinov2"), progress=False)
    assert "nothing was kept" in str(e.value)
    _nothing_cached(tmp_path, repo)
    assert cached_weights(resolve("dinov2")) is None


def test_file_that_is_not_safetensors_is_refused_and_not_kept(hub, tmp_path) -> None:
    repo = _repo("dinov2")
    hub.add(repo, "model.safetensors", b"<html>proxy login page</html>" * 50)
    with pytest.raises(WeightsUnavailable, match="not a readable safetensors"):
        fetch_weights(resolve("dinov2"), progress=False)
    _nothing_cached(tmp_path, repo)


def test_weights_of_the_wrong_shapes_are_refused_and_no_store_is_written(
    hub, tmp_path, shared_image_set
) -> None:
    repo = _repo("dinov2")
    hub.add(repo, "model.safetensors", tiny_state_bytes("vit", 3))  # another model's weights
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        load_backbone(resolve("dinov2"), tiny=True)
    store = tmp_path / "s.zarr"
    cfg = ExtractConfig(manifest=shared_image_set.manifest, store=store, backbones=("dinov2",),
                        tiny=True, dtype="fp32", progress=False)  # fmt: skip
    with pytest.raises(WeightsUnavailable, match="does not fit"):
        run_extract(cfg)
    assert not store.exists()


def test_a_damaged_cached_blob_is_refused(hub) -> None:
    got = fetch_weights(resolve("vit"), progress=False)
    blob = got.path.resolve()
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(raw))
    with pytest.raises(WeightsUnavailable, match="damaged"):
        load_backbone(resolve("vit"), tiny=True)
    rows = {r.key: r for r in run_weights_list(WeightsListConfig(backbones=("vit", "dinov2")))}
    assert rows["vit"].status == "damaged" and rows["dinov2"].status == "missing"


# ---------------------------------------------------------------- no network
def _assert_ways_out(msg: str, key: str) -> None:
    assert f"usae weights fetch {key}" in msg and f"--weights {key}=FILE" in msg
    assert "--random-init" in msg


def test_offline_never_touches_the_network_and_fails_fast(hub, tmp_path, monkeypatch) -> None:
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf" / "hub", offline=True)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        load_backbone(resolve("dinov2"), tiny=True)
    assert time.perf_counter() - t0 < 2.0
    assert "offline" in str(e.value) and hub.log == []
    _assert_ways_out(str(e.value), "dinov2")
    # the option, with the environment online
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf" / "hub", offline=False)
    with pytest.raises(WeightsUnavailable, match="offline"):
        fetch_weights(resolve("dinov2"), offline=True)
    assert hub.log == []
    # what is cached loads offline, without a request
    fetch_weights(resolve("dinov2"), progress=False)
    n = len(hub.log)
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf" / "hub", offline=True)
    assert load_backbone(resolve("dinov2"), tiny=True).identity["file"]["origin"] == "hf-hub"
    assert len(hub.log) == n


def test_unreachable_hub_fails_in_seconds_naming_the_ways_out(tmp_path, monkeypatch) -> None:
    point_hub_at(monkeypatch, closed_port_url(), tmp_path / "hf" / "hub")  # connection refused
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="can't be reached") as e:
        load_backbone(resolve("siglip"), tiny=True)
    assert time.perf_counter() - t0 < 3.0
    _assert_ways_out(str(e.value), "siglip")

    sock, url = blackhole()  # accepts, never answers: the timeout, no retry loop
    try:
        point_hub_at(monkeypatch, url, tmp_path / "hf" / "hub")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT", 1)
        t0 = time.perf_counter()
        with pytest.raises(WeightsUnavailable, match="can't be reached"):
            fetch_weights(resolve("siglip"))
        assert time.perf_counter() - t0 < 4.0
    finally:
        sock.close()


def test_a_repo_without_the_files_is_named(hub) -> None:
    hub.add(_repo("siglip"), "README.md", b"no weights here")
    with pytest.raises(WeightsUnavailable, match="has none of"):
        fetch_weights(resolve("siglip"))
    with pytest.raises(WeightsUnavailable, match="refused"):  # a repo the hub doesn't know
        fetch_weights(resolve("timm:vit_tiny_patch16_224.augreg_in21k"))


# ---------------------------------------------------------------- the CLI
def _app() -> typer.Typer:
    app = typer.Typer()
    register_weights(app)
    return app


def test_weights_fetch_and_list_commands(hub) -> None:
    app = _app()
    res = CliRunner().invoke(app, ["weights", "fetch", "dinov2,vit", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "downloaded" in res.output and "dinov2" in res.output
    res = CliRunner().invoke(app, ["weights", "fetch", "dinov2,vit", "--no-progress"])
    assert res.exit_code == 0 and "cached" in res.output and "downloaded" not in res.output

    res = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["key"]: r for r in json.loads(res.output)["backbones"]}
    assert {"dinov2", "siglip", "vit"} <= set(rows)  # every registry entry
    for key in ("dinov2", "vit"):
        data = hub.repos[_repo(key)].files["model.safetensors"].data
        assert rows[key]["status"] == "cached" and rows[key]["size"] == len(data)
        assert rows[key]["sha256"] == hashlib.sha256(data).hexdigest()
        assert rows[key]["commit"] == hub.repos[_repo(key)].commit
    assert rows["siglip"]["status"] == "missing" and rows["siglip"]["sha256"] is None
    res = CliRunner().invoke(app, ["weights", "list"])
    assert res.exit_code == 0 and "missing" in res.output and "cached" in res.output

    # a backbone the hub can't give: the others are fetched, the table shown, exit code 2
    n_get = len(hub.requests("GET"))
    res = CliRunner().invoke(app, ["weights", "fetch", "siglip,dinov2", "--no-progress"])
    assert res.exit_code == USER_ERROR_EXIT, res.output
    assert "siglip" in res.output and "refused" in res.output and "failed" in res.output
    assert len(hub.requests("GET")) == n_get


# ---------------------------------------------------------------- extraction
def test_extract_with_downloaded_weights_equals_the_same_weights_as_files(
    hub, tmp_path, shared_image_set
) -> None:
    files = []
    for key in ("dinov2", "vit"):
        p = tmp_path / f"{key}.safetensors"
        p.write_bytes(hub.repos[_repo(key)].files["model.safetensors"].data)
        files.append((key, str(p)))
    common = dict(manifest=shared_image_set.manifest, backbones=("dinov2", "vit"), tiny=True,
                  dtype="fp32", progress=False, chunk_images=8, grid=(7, 7))  # fmt: skip
    run_extract(ExtractConfig(store=tmp_path / "hub.zarr", **common))
    run_extract(ExtractConfig(store=tmp_path / "file.zarr", weights=tuple(files), **common))
    a, b = Store.open(tmp_path / "hub.zarr"), Store.open(tmp_path / "file.zarr")
    for key in ("dinov2", "vit"):
        for i in range(a.n_chunks):
            np.testing.assert_array_equal(a.read_chunk(key, i), b.read_chunk(key, i))
        sa, sb = a.spec(key)["identity"], b.spec(key)["identity"]
        data = hub.repos[_repo(key)].files["model.safetensors"].data
        sha = hashlib.sha256(data).hexdigest()
        assert sa["sha256"] == sb["sha256"] and not sa["random_init"]
        assert sa["file"]["repo_id"] == _repo(key) and sa["file"]["sha256"] == sha
        assert sa["file"]["revision"] == hub.repos[_repo(key)].commit
        assert sb["file"] == {
            "origin": "file",
            "filename": f"{key}.safetensors",
            "size": len(data),
            "sha256": sha,
        }
    assert len(hub.requests("GET", "/cdn/")) == 2  # each file downloaded once


def test_torch_state_dict_is_served_too(hub, tmp_path) -> None:
    """A repo with only pytorch_model.bin (timm's fallback name) is fetched and loaded safely."""
    repo = _repo("dinov2")
    del hub.repos[repo].files["model.safetensors"]
    ref = load_backbone(resolve("dinov2"), tiny=True, random_init=True, seed=7)
    buf = io.BytesIO()
    torch.save(ref.model.state_dict(), buf)
    hub.add(repo, "pytorch_model.bin", buf.getvalue())
    bb = load_backbone(resolve("dinov2"), tiny=True)
    assert bb.identity["file"]["filename"] == "pytorch_model.bin"
    assert bb.identity["sha256"] == ref.identity["sha256"]


# ---------------------------------------------------------------- the demo's weights
def test_demo_downloads_what_is_missing_and_falls_back_loudly(hub, monkeypatch):
    """Online, the demo fetches the defaults it does not have; one the hub lacks (siglip here)
    runs random-init with the reason; offline, everything not cached is random-init."""
    from usae.demo import DemoConfig, _weights_plan

    plan = _weights_plan(DemoConfig(backbones=("dinov2", "vit", "siglip")))
    assert plan.pretrained == ("dinov2", "vit") and plan.random == ("siglip",)
    assert "could not download" in plan.why and "siglip" in plan.why
    assert all(Path(f).is_file() for _, f in plan.pairs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    gets = len(hub.requests("GET"))
    plan = _weights_plan(DemoConfig(backbones=("dinov2", "siglip")))
    assert plan.pretrained == ("dinov2",) and plan.random == ("siglip",) and "offline" in plan.why
    assert len(hub.requests("GET")) == gets  # offline: no request
    assert _weights_plan(DemoConfig(tiny=True)).random == ("dinov2", "siglip", "vit")


def test_extract_offline_option_never_touches_the_network(hub, tmp_path, shared_image_set):
    """usae extract --offline: a backbone not in the cache fails in seconds with the ways out,
    and no request reaches the hub."""
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="usae weights fetch dinov2"):
        run_extract(
            ExtractConfig(
                manifest=shared_image_set.manifest,
                store=tmp_path / "s.zarr",
                backbones=("dinov2",),
                tiny=True,
                offline=True,
                progress=False,
            )
        )
    assert time.perf_counter() - t0 < 5 and not hub.requests()
