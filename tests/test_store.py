"""Store contract: round trip, alignment, exact statistics, commit/resume, refusal."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from usae.pipeline.store import BackboneLayout, RunningStats, Store, StoreError

from usae.runtime import holdout_mask


def _fill(store: Store, data: dict[str, np.ndarray], valid: np.ndarray, chunks=None) -> None:
    for i in chunks if chunks is not None else range(store.n_chunks):
        r0, r1 = store.chunk_rows(i)
        a, b = store.chunk_images_range(i)
        fails = [
            {"image_id": f"img{j}", "path": f"p{j}", "reason": "bad"}
            for j in range(a, b)
            if not valid[j]
        ]
        store.write_chunk(i, {k: v[r0:r1] for k, v in data.items()}, valid[a:b], failures=fails)


def _make(
    tmp_path, n, tpi_hw, chunk, widths, seed=0, valid=None, name="s.zarr", store_dtype="float16"
):
    rng = np.random.default_rng(seed)
    t = tpi_hw[0] * tpi_hw[1]
    layouts = [BackboneLayout(f"b{j}", w) for j, w in enumerate(widths)]
    st_ = Store.create(
        tmp_path / name,
        [f"img{i}" for i in range(n)],
        layouts,
        grid=tpi_hw,
        chunk_images=chunk,
        source="synth",
        fingerprint_of={"seed": seed},
        store_dtype=store_dtype,
    )
    data = {
        f"b{j}": (rng.normal(size=(n * t, w)) * 3 + 1).astype(np.float16)
        for j, w in enumerate(widths)
    }
    valid = np.ones(n, bool) if valid is None else valid
    _fill(st_, data, valid)
    st_.finalize()
    return Store.open(tmp_path / name), data, valid


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 13),
    gh=st.integers(1, 3),
    gw=st.integers(1, 3),
    chunk=st.integers(1, 5),
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_and_alignment(tmp_path_factory, n, gh, gw, chunk, widths, seed):
    tmp = tmp_path_factory.mktemp("rt")
    rng = np.random.default_rng(seed)
    valid = rng.random(n) > 0.2
    store, data, valid = _make(tmp, n, (gh, gw), chunk, widths, seed, valid)
    t = gh * gw
    assert store.n_rows == n * t and store.complete
    assert list(store.image_ids) == [f"img{i}" for i in range(n)]
    np.testing.assert_array_equal(store.valid, valid)
    for k, x in data.items():
        direct = np.concatenate([store.read_chunk(k, i) for i in range(store.n_chunks)])
        np.testing.assert_array_equal(direct, x)  # direct chunk-file reads == what was written
        np.testing.assert_array_equal(store.read_rows(k, 0, n * t), x)  # zarr path agrees
        mapped = np.concatenate([store.map_chunk(k, i) for i in range(store.n_chunks)])
        np.testing.assert_array_equal(mapped, x)  # memory-mapped chunk files agree
        np.testing.assert_array_equal(
            _pread_all(store, k), x
        )  # and so do preads through open_chunk
        # exact stats over valid rows only
        rows = np.repeat(valid, t)
        ref = x[rows].astype(np.float64)
        s = store.stats(k)
        assert s["count"] == rows.sum()
        if rows.any():
            np.testing.assert_allclose(s["mean"], ref.mean(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(s["scalar_mean"], ref.mean(), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(s["scalar_std"], ref.std(), rtol=1e-9, atol=1e-9)
    # failures merged from the commit markers, in image order
    assert [f["image_id"] for f in store.failures] == [f"img{i}" for i in range(n) if not valid[i]]


def test_row_is_same_image_and_position_in_every_backbone(tmp_path):
    n, g, chunk = 7, (2, 3), 3
    t = g[0] * g[1]
    st_ = Store.create(
        tmp_path / "a.zarr",
        [str(i) for i in range(n)],
        [BackboneLayout("x", 2), BackboneLayout("y", 5)],
        grid=g,
        chunk_images=chunk,
        source="synth",
        fingerprint_of=1,
    )
    # content encodes (image, token) differently per backbone
    img, tok = np.divmod(np.arange(n * t), t)
    data = {
        "x": np.stack([img, tok], 1).astype(np.float16),
        "y": np.stack([tok, img, img, tok, img + tok], 1).astype(np.float16),
    }
    _fill(st_, data, np.ones(n, bool))
    st_.finalize()
    s = Store.open(tmp_path / "a.zarr")
    for i in range(s.n_chunks):
        x, y = s.read_chunk("x", i), s.read_chunk("y", i)
        np.testing.assert_array_equal(x[:, 0], y[:, 1])
        np.testing.assert_array_equal(x[:, 1], y[:, 0])


def test_running_stats_merge_equals_whole():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(101, 4)) * 5 + 2
    parts = [x[:10], x[10:11], x[11:11], x[11:]]
    m = RunningStats.empty(4)
    for p in parts:
        m = m.merge(RunningStats.of(p))
    np.testing.assert_allclose(m.mean, x.mean(0))
    np.testing.assert_allclose(m.m2, ((x - x.mean(0)) ** 2).sum(0))
    mu, sd = m.scalar()
    assert np.isclose(mu, x.mean()) and np.isclose(sd, x.std())


def test_resume_skips_committed_and_refuses_other_settings(tmp_path):
    ids = [f"i{j}" for j in range(10)]
    lay = [BackboneLayout("a", 3)]
    same = dict(grid=(1, 2), chunk_images=4, source="synth", fingerprint_of="v1")
    s = Store.create(tmp_path / "s.zarr", ids, lay, **same)
    data = {"a": np.arange(60, dtype=np.float16).reshape(20, 3)}
    _fill(s, data, np.ones(10, bool), chunks=[0])
    with pytest.raises(StoreError, match="uncommitted"):
        s.finalize()
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(tmp_path / "s.zarr")
    # same settings: reopened, not recreated; committed chunk kept
    s2 = Store.create(tmp_path / "s.zarr", ids, lay, **same)
    assert s2.committed_chunks() == {0}
    _fill(s2, data, np.ones(10, bool), chunks=[1, 2])
    s2.finalize()
    np.testing.assert_array_equal(Store.open(tmp_path / "s.zarr").read_rows("a", 0, 20), data["a"])
    with pytest.raises(StoreError, match="different manifest or settings"):
        Store.create(
            tmp_path / "s.zarr",
            ids,
            lay,
            grid=(1, 2),
            chunk_images=4,
            source="synth",
            fingerprint_of="v2",
        )
    with pytest.raises(StoreError, match="immutable"):
        s2.write_chunk(0, {"a": data["a"][:8]}, np.ones(4, bool))


def test_rejects_foreign_or_future_stores(tmp_path):
    with pytest.raises(StoreError, match="not a usae store"):
        Store.open(tmp_path)
    s, _, _ = _make(tmp_path, 3, (1, 1), 2, [2])
    meta = tmp_path / "s.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="schema_version 99"):
        Store.open(tmp_path / "s.zarr")


def _pread_all(store: Store, key: str) -> np.ndarray:
    """Every row of a backbone, chunk by chunk, through open_chunk + os.preadv."""
    parts = []
    for i in range(store.n_chunks):
        r0, r1 = store.chunk_rows(i)
        out = np.zeros((r1 - r0, store.widths[key]), np.float16)
        fd = store.open_chunk(key, i)
        if fd is not None:
            try:
                assert os.preadv(fd, [memoryview(out).cast("B")], 0) == out.nbytes
            finally:
                os.close(fd)
        parts.append(out)
    return np.concatenate(parts)


def test_read_ahead_is_asked_only_for_chunks_not_in_the_page_cache(tmp_path, monkeypatch):
    from usae.pipeline import chunk_files

    s, _, _ = _make(tmp_path, 4, (2, 2), 2, [3])
    s.read_chunk("b0", 0)  # now in the page cache
    fd = os.open(s.chunk_file("b0", 0), os.O_RDONLY)
    try:
        assert chunk_files.page_cached(fd, 8 * 3 * 2) == hasattr(os, "RWF_NOWAIT")
    finally:
        os.close(fd)
    if not hasattr(os, "posix_fadvise"):
        return
    asked = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: asked.append((n, advice)))
    os.close(s.open_chunk("b0", 0))
    assert asked == ([] if hasattr(os, "RWF_NOWAIT") else [(48, os.POSIX_FADV_WILLNEED)])
    monkeypatch.setattr(chunk_files, "page_cached", lambda fd, n: False)
    os.close(s.open_chunk("b0", 0))
    assert asked[-1] == (48, os.POSIX_FADV_WILLNEED)


def test_truncated_chunk_file_is_detected(tmp_path):
    s, _, _ = _make(tmp_path, 4, (2, 2), 2, [3])
    f = s.chunk_file("b0", 1)
    f.write_bytes(f.read_bytes()[:10])
    for read in (s.read_chunk, s.map_chunk, s.open_chunk):  # mapping past the end would be a SIGBUS
        with pytest.raises(StoreError, match="truncated"):
            read("b0", 1)


def test_mapped_and_opened_chunks_never_written_are_zeros_and_need_raw_arrays(tmp_path):
    s, _, _ = _make(tmp_path, 4, (2, 2), 2, [3])
    s.chunk_file("b0", 1).unlink()  # as zarr leaves a chunk that is all fill value
    assert s.open_chunk("b0", 1) is None
    z = s.map_chunk("b0", 1)
    assert z.shape == (8, 3) and not z.any() and not z.flags.writeable
    np.testing.assert_array_equal(s.read_chunk("b0", 1), z)
    s._direct["b0"] = False  # a compressed array: only read_chunk (through zarr) applies
    for read in (s.map_chunk, s.open_chunk):
        with pytest.raises(StoreError, match="not stored raw"):
            read("b0", 0)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_read_chunk_rows_matches_rows_of_read_chunk(tmp_path, dtype):
    s, _, _ = _make(tmp_path, 6, (2, 2), 2, [3, 5], store_dtype=dtype)
    rows = np.array([7, 0, 3, 3])
    for c in range(s.n_chunks):
        for k in s.backbones:
            np.testing.assert_array_equal(s.read_chunk_rows(k, c, rows), s.read_chunk(k, c)[rows])
    s._direct["b0"] = False  # a compressed array: through zarr
    np.testing.assert_array_equal(s.read_chunk_rows("b0", 1, rows), s.read_chunk("b0", 1)[rows])


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(StoreError, match="duplicate"):
        Store.create(
            tmp_path / "d.zarr",
            ["a", "a"],
            [BackboneLayout("x", 1)],
            grid=(1, 1),
            chunk_images=1,
            source="synth",
            fingerprint_of=0,
        )


def test_holdout_mask_is_stable_and_near_fraction():
    ids = [f"n{i:05d}" for i in range(20000)]
    m1 = holdout_mask(ids, 0.1)
    m2 = holdout_mask(list(reversed(ids)), 0.1)[::-1]
    np.testing.assert_array_equal(m1, m2)
    assert 0.09 < m1.mean() < 0.11
    # a given id's answer does not depend on which other ids are present
    assert holdout_mask(ids[5:6], 0.1)[0] == m1[5]
    assert not holdout_mask(ids, 0.0).any()
    with pytest.raises(ValueError):
        holdout_mask(ids, 1.0)


def test_image_source_is_recorded_not_fingerprinted(tmp_path):
    """The record of where the images are: written at creation, replaced by a resume of an
    incomplete store (the path that finishes it), kept once complete; never in the fingerprint;
    carried over by convert_store; absent from stores created without one."""
    from usae.pipeline.store import convert_store

    ids = [f"i{j}" for j in range(8)]
    lay = [BackboneLayout("a", 3)]
    same = dict(grid=(1, 2), chunk_images=4, source="extract", fingerprint_of="v1")
    src_a, src_b = ({"manifest": f"{d}/m.csv", "manifest_abs": f"/{d}/m.csv", "image_root": "",
                     "image_root_abs": f"/{d}"} for d in ("a", "b"))  # fmt: skip
    s = Store.create(tmp_path / "s.zarr", ids, lay, image_source=src_a, **same)
    fp = s.attrs["fingerprint"]
    assert Store(tmp_path / "s.zarr").image_source == src_a
    data = {"a": np.arange(48, dtype=np.float16).reshape(16, 3)}
    _fill(s, data, np.ones(8, bool), chunks=[0])
    s2 = Store.create(tmp_path / "s.zarr", ids, lay, image_source=src_b, **same)  # resumed
    assert s2.attrs["fingerprint"] == fp and Store(tmp_path / "s.zarr").image_source == src_b
    _fill(s2, data, np.ones(8, bool), chunks=[1])
    s2.finalize()
    s3 = Store.create(tmp_path / "s.zarr", ids, lay, image_source=src_a, **same)  # complete
    assert s3.image_source == src_b and Store.open(tmp_path / "s.zarr").image_source == src_b
    assert convert_store(tmp_path / "s.zarr", tmp_path / "q.zarr").image_source == src_b
    assert Store.create(tmp_path / "n.zarr", ids, lay, **same).image_source is None


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(labels=st.lists(st.text(max_size=6), min_size=1, max_size=9), to_int8=st.booleans())
def test_label_array_round_trip(tmp_path_factory, labels, to_int8):
    """The optional per-image label array reads back as written ("" allowed) and survives a
    conversion; a store without one has none; a length mismatch is refused."""
    from usae.pipeline.store import convert_store

    tmp = tmp_path_factory.mktemp("lab")
    n = len(labels)
    layouts = [BackboneLayout("b0", 3)]
    kw = dict(grid=(1, 2), chunk_images=4, source="synth", fingerprint_of={"n": n})
    st_ = Store.create(tmp / "s.zarr", [f"i{j}" for j in range(n)], layouts, labels=labels, **kw)
    _fill(st_, {"b0": np.ones((2 * n, 3), np.float16)}, np.ones(n, bool))
    st_.finalize()
    assert list(Store.open(tmp / "s.zarr").labels) == labels
    if to_int8:
        assert list(convert_store(tmp / "s.zarr", tmp / "c.zarr", "int8").labels) == labels
    other = Store.create(tmp / "o.zarr", ["a"], layouts, **{**kw, "fingerprint_of": 1})
    assert other.labels is None
    with pytest.raises(StoreError, match="labels"):
        Store.create(tmp / "bad.zarr", ["a", "b"], layouts, labels=["x"], **kw)
