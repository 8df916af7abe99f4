"""ChunkLoader: exactly-once epochs, cross-backbone alignment, determinism, exact resume,
rank slicing, equality with a slow reference of the contract's stream, bounded memory."""

from __future__ import annotations

import os
import threading
import tracemalloc
from itertools import islice

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from usae.pipeline.store import BackboneLayout, Store, StoreError
from usae.trainer import loader as loader_module
from usae.trainer.loader import DEFAULT_BUFFER_CHUNKS, ChunkLoader

WIDTHS = {"a": 3, "b": 5}


def _make_store(path, n_images, tpi, chunk_images, valid=None, widths=WIDTHS):
    """Row r holds (r % 1024, r // 1024, backbone index, ...) exactly in float16."""
    layouts = [BackboneLayout(k, d) for k, d in widths.items()]
    s = Store.create(
        path,
        [f"i{i}" for i in range(n_images)],
        layouts,
        grid=(1, tpi),
        chunk_images=chunk_images,
        source="synth",
        fingerprint_of={"n": n_images},
    )
    valid = np.ones(n_images, bool) if valid is None else valid
    for c in range(s.n_chunks):
        r0, r1 = s.chunk_rows(c)
        rows = np.arange(r0, r1)
        toks = {}
        for j, (k, d) in enumerate(widths.items()):
            x = np.full((r1 - r0, d), j, np.float16)
            x[:, 0], x[:, 1] = rows % 1024, rows // 1024
            toks[k] = x
        a, b = s.chunk_images_range(c)
        s.write_chunk(c, toks, valid[a:b])
    s.finalize()
    return Store.open(path)


def _tokens(*args, **kw) -> ChunkLoader:
    """A loader of the token-shuffled stream (the default is shuffle="images")."""
    return ChunkLoader(*args, shuffle="tokens", **kw)


def _ids(t: torch.Tensor) -> np.ndarray:
    x = t.numpy().astype(np.int64)
    return x[:, 0] + 1024 * x[:, 1]


def _epoch(loader, n=None):
    return list(islice(iter(loader), n if n is not None else loader.batches_per_epoch))


def _assert_two_epochs_match(ld, reference) -> None:
    """Two epochs of `ld` equal this rank's slice of `reference(epoch)` (a list of batches)."""
    n, bsz = ld.batches_per_epoch, ld.batch_tokens
    got = _epoch(ld, 2 * n)
    lo, hi = ld.rank * bsz // ld.world_size, (ld.rank + 1) * bsz // ld.world_size
    for e in range(2):
        ref = reference(e)
        assert len(ref) == n
        for i in range(n):
            assert (got[e * n + i].epoch, got[e * n + i].step) == (e, i)
            for j in range(len(ref[i])):
                np.testing.assert_array_equal(got[e * n + i].acts[j].numpy(), ref[i][j][lo:hi])


def _reference_blocks(store, images, seed, buffer_chunks, epoch):
    """The contract's blocks of epoch `epoch`: each block's selected images, chunk by chunk."""
    sel = store.valid & (np.ones(store.n_images, bool) if images is None else images)
    counts = [sel[slice(*store.chunk_images_range(c))].sum() for c in range(store.n_chunks)]
    active = [c for c in range(store.n_chunks) if counts[c]]
    order = np.random.default_rng([seed, 0, epoch]).permutation(np.array(active, dtype=np.int64))
    return [
        [
            i
            for c in order[b0 : b0 + buffer_chunks]
            for i in range(*store.chunk_images_range(int(c)))
            if sel[i]
        ]
        for b0 in range(0, len(order), buffer_chunks)
    ]


def _slow_stream(store, keys, bsz, images, seed, buffer_chunks, epoch):
    """The contract's definition of epoch `epoch`, with plain zarr row reads."""
    t = store.tokens_per_image
    stream = []
    for bi, imgs in enumerate(_reference_blocks(store, images, seed, buffer_chunks, epoch)):
        rows = [r for img in imgs for r in range(img * t, (img + 1) * t)]
        perm = np.random.default_rng([seed, 1, epoch, bi]).permutation(len(rows))
        stream.extend((bi, int(p), rows[p]) for p in perm)  # (block, place in the block, store row)
    batches = []
    for i in range(len(stream) // bsz):  # a batch's rows, ordered by their place in their block
        rows = [r for _, _, r in sorted(stream[i * bsz : (i + 1) * bsz])]
        batches.append([np.stack([store.read_rows(k, r, r + 1)[0] for r in rows]) for k in keys])
    return batches


@pytest.fixture
def split_small_gathers(monkeypatch):
    """Split even the tiny gathers of these tests across the gather threads."""
    monkeypatch.setattr(loader_module, "_MIN_SPLIT_BYTES", 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    valid = np.ones(50, bool)
    valid[[3, 17, 18, 40]] = False
    return _make_store(tmp_path_factory.mktemp("ld") / "s.zarr", 50, 6, 7, valid)


def test_every_row_once_per_epoch_and_aligned(store):
    held = np.zeros(50, bool)
    held[[0, 9, 25, 49]] = True
    ld = _tokens(store, ["b", "a"], 12, images=~held, seed=3, buffer_chunks=2)
    expect = np.flatnonzero(np.repeat(store.valid & ~held, 6))
    assert ld.tokens_per_epoch == len(expect) == 252 and ld.batches_per_epoch == 21
    batches = _epoch(ld)
    ids_b = np.concatenate([_ids(b.acts[0]) for b in batches])
    ids_a = np.concatenate([_ids(b.acts[1]) for b in batches])
    np.testing.assert_array_equal(ids_a, ids_b)  # aligned across backbones
    np.testing.assert_array_equal(np.sort(ids_a), expect)  # exactly once, nothing held out/invalid
    assert not np.array_equal(ids_a, expect)  # shuffled
    for j, k in enumerate(["b", "a"]):  # content == slow reads through zarr
        got = np.concatenate([b.acts[j].numpy() for b in batches])
        np.testing.assert_array_equal(got, store.read_rows(k, 0, store.n_rows)[ids_a])
    b0 = batches[0]
    assert (
        b0.acts[0].dtype == torch.float16
        and b0.acts[0].shape == (12, 5)
        and b0.acts[1].shape == (12, 3)
    )
    assert [(b.epoch, b.step) for b in batches] == [(0, i) for i in range(21)]


def test_partial_last_batch_dropped_and_epochs_differ(store):
    ld = _tokens(store, ["a"], 50, seed=1)
    assert ld.tokens_per_epoch == 276 and ld.batches_per_epoch == 5
    it = iter(ld)
    e0 = [next(it) for _ in range(5)]
    e1 = [next(it) for _ in range(5)]
    assert {b.epoch for b in e0} == {0} and {b.epoch for b in e1} == {1}
    ids0 = np.concatenate([_ids(b.acts[0]) for b in e0])
    ids1 = np.concatenate([_ids(b.acts[0]) for b in e1])
    assert len(set(ids0)) == 250 and len(set(ids1)) == 250 and not np.array_equal(ids0, ids1)
    assert ld.state_dict() == {"epoch": 2, "step": 0}


def test_deterministic_for_seed(store):
    a = [_ids(b.acts[0]) for b in _epoch(_tokens(store, ["a"], 16, seed=5))]
    b = [_ids(b.acts[0]) for b in _epoch(_tokens(store, ["a"], 16, seed=5, prefetch=0))]
    c = [_ids(b.acts[0]) for b in _epoch(_tokens(store, ["a"], 16, seed=6))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("stop_at", [0, 1, 7, 16, 17, 25])
def test_resume_equals_uninterrupted(store, stop_at):
    ref = _tokens(store, ["a", "b"], 16, seed=2, buffer_chunks=3)
    assert ref.batches_per_epoch == 17
    full = _epoch(ref, 34)
    ld = _tokens(store, ["a", "b"], 16, seed=2, buffer_chunks=3)
    got = _epoch(ld, stop_at)
    state = ld.state_dict()
    assert state == {"epoch": stop_at // 17, "step": stop_at % 17}
    fresh = _tokens(store, ["a", "b"], 16, seed=2, buffer_chunks=3)
    fresh.load_state_dict(state)
    got += _epoch(fresh, 34 - stop_at)
    for x, y in zip(full, got, strict=True):
        assert (x.epoch, x.step) == (y.epoch, y.step)
        for p, q in zip(x.acts, y.acts, strict=True):
            assert torch.equal(p, q)


def test_rank_slices_concatenate_to_global_batch(store):
    full = _epoch(_tokens(store, ["a", "b"], 14, seed=4, buffer_chunks=2))
    parts = [
        _epoch(_tokens(store, ["a", "b"], 14, seed=4, buffer_chunks=2, rank=r, world_size=2))
        for r in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(full)
    for g, r0, r1 in zip(full, *parts, strict=True):
        assert r0.acts[0].shape[0] == 7
        for j in range(2):
            assert torch.equal(torch.cat([r0.acts[j], r1.acts[j]]), g.acts[j])


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_images=st.integers(1, 14),
    tpi=st.integers(1, 4),
    chunk=st.integers(1, 5),
    bsz=st.integers(1, 20),
    buffer_chunks=st.integers(1, 4),
    prefetch=st.integers(0, 2),
    seed=st.integers(0, 99),
    direct=st.booleans(),
    threads=st.integers(1, 3),
    data=st.data(),
)
def test_property_matches_slow_reference(
    tmp_path_factory,
    split_small_gathers,
    n_images,
    tpi,
    chunk,
    bsz,
    buffer_chunks,
    prefetch,
    seed,
    direct,
    threads,
    data,
):
    valid = np.array(data.draw(st.lists(st.booleans(), min_size=n_images, max_size=n_images)))
    images = np.array(data.draw(st.lists(st.booleans(), min_size=n_images, max_size=n_images)))
    store = _make_store(tmp_path_factory.mktemp("p") / "s.zarr", n_images, tpi, chunk, valid)
    if not direct:
        _undirect(store)
    n_sel = int((valid & images).sum()) * tpi
    if n_sel < bsz:
        with pytest.raises(ValueError, match="larger than"):
            _tokens(store, ["a", "b"], bsz, images=images)
        return
    ws = data.draw(st.sampled_from([w for w in (1, 2, 3) if bsz % w == 0]))
    rank = data.draw(st.integers(0, ws - 1))
    ld = _tokens(
        store,
        ["a", "b"],
        bsz,
        images=images,
        seed=seed,
        buffer_chunks=buffer_chunks,
        prefetch=prefetch,
        rank=rank,
        world_size=ws,
        gather_threads=threads,
    )
    assert ld.read_mode == ("map" if direct else "pool")
    _assert_two_epochs_match(
        ld, lambda e: _slow_stream(store, ["a", "b"], bsz, images, seed, buffer_chunks, e)
    )


def _peak_bytes(store, **kw):
    ld = ChunkLoader(store, ["a", "b"], 64, seed=0, **kw)
    tracemalloc.start()
    try:
        seen = sum(b.acts[0].shape[0] for b in islice(iter(ld), ld.batches_per_epoch))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == ld.batches_per_epoch * 64 == ld.tokens_per_epoch
    return peak


@pytest.mark.parametrize("shuffle", ["tokens", "images"])
@pytest.mark.parametrize("pool", [True, False])
def test_memory_bounded_by_chunk_pool(tmp_path, pool, shuffle):
    widths = {"a": 64, "b": 96}
    small = _make_store(tmp_path / "s.zarr", 400, 16, 10, widths=widths)  # 40 chunks
    big = _make_store(tmp_path / "b.zarr", 1600, 16, 10, widths=widths)  # 160 chunks
    if pool:
        _undirect(small), _undirect(big)
    chunk_bytes, batch_bytes = 10 * 16 * 160 * 2, 64 * 160 * 2
    p_small = _peak_bytes(small, buffer_chunks=3, prefetch=2, shuffle=shuffle)
    p_big = _peak_bytes(big, buffer_chunks=3, prefetch=2, shuffle=shuffle)
    # a pool of 3 + 2 chunks (none when the chunk files are mapped or read directly), a few
    # batches, index arrays; whatever the store size (the epoch's block list grows with it)
    assert p_small < (5 * chunk_bytes if pool else 0) + 10 * batch_bytes + 64 * 1024, p_small
    assert p_big < p_small + 64 * 1024, (p_small, p_big)
    assert p_big < 0.2 * 160 * chunk_bytes


def test_threads_stop_and_errors_reach_the_trainer(tmp_path):
    store = _make_store(tmp_path / "s.zarr", 20, 4, 5)
    ld = _tokens(store, ["a"], 8)
    for _ in islice(iter(ld), 3):
        pass
    assert not [t for t in threading.enumerate() if t.name.startswith("usae-loader")]
    with open(store.chunk_file("a", 2), "r+b") as f:
        f.truncate(10)
    with pytest.raises(StoreError, match="truncated"):
        for _ in _tokens(store, ["a"], 8, buffer_chunks=1):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("usae-loader")]


def test_argument_errors(store):
    with pytest.raises(ValueError, match="not in the store"):
        _tokens(store, ["zz"], 8)
    with pytest.raises(ValueError, match="images mask"):
        _tokens(store, ["a"], 8, images=np.ones(3, bool))
    with pytest.raises(ValueError, match="multiple of world_size"):
        _tokens(store, ["a"], 9, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        _tokens(store, ["a"], 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="larger than"):
        _tokens(store, ["a"], 10_000)
    with pytest.raises(ValueError, match="buffer_chunks must be"):
        _tokens(store, ["a"], 8, buffer_chunks=-1)
    with pytest.raises(ValueError, match="gather_threads must be"):
        _tokens(store, ["a"], 8, gather_threads=0)


def test_default_shuffle_block_by_read_mode(store, tmp_path):
    """Without buffer_chunks, a block is as many chunks as cost no memory: batches drawn from more of the store."""
    assert ChunkLoader(store, ["a"], 8).buffer_chunks == DEFAULT_BUFFER_CHUNKS["pread"] == 64
    assert _tokens(store, ["a"], 8).buffer_chunks == DEFAULT_BUFFER_CHUNKS["map"]
    pooled = _undirect(_make_store(tmp_path / "p.zarr", 20, 4, 5))
    assert (
        _tokens(pooled, ["a"], 8).buffer_chunks == ChunkLoader(pooled, ["a"], 8).buffer_chunks == 4
    )
    assert ChunkLoader(store, ["a"], 8, buffer_chunks=3).buffer_chunks == 3
    # images of a class-sorted store (10 chunks of 5): the default block mixes every chunk into a batch
    big = _make_store(tmp_path / "b.zarr", 50, 2, 5)
    chunks_per_batch = [
        len(set(_ids(b.acts[0]) // 10)) for b in _epoch(ChunkLoader(big, ["a"], 20, seed=1))
    ]
    assert np.mean(chunks_per_batch) > 5, chunks_per_batch
    few = [
        len(set(_ids(b.acts[0]) // 10))
        for b in _epoch(ChunkLoader(big, ["a"], 20, seed=1, buffer_chunks=1))
    ]
    assert max(few) <= 2, few


def test_too_many_open_files_is_refused_up_front(store, monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (64, 64))
    with pytest.raises(ValueError, match="open files"):
        ChunkLoader(store, ["a", "b"], 8, buffer_chunks=20)
    assert ChunkLoader(store, ["a", "b"], 8, buffer_chunks=4).read_mode == "pread"


def test_batch_buffers_recycled_only_when_dropped(store):
    from usae.trainer.loader import _SPARE_BATCHES

    ld = _tokens(store, ["a", "b"], 8, seed=0)
    ptrs, kept, views = set(), [], []
    for n, b in enumerate(islice(iter(ld), 3 * ld.batches_per_epoch)):
        ptrs.add(b.acts[1].data_ptr())
        if n % 10 == 0:  # keep a view (not the batch or tensor object) and a copy of its content
            views.append(b.acts[1][2:5])
            kept.append(b.acts[1][2:5].clone())
        if n == 7:
            whole = b  # keep one whole batch
            whole_copy = [a.clone() for a in b.acts]
    for v, c in zip(views, kept, strict=True):
        assert torch.equal(v, c)  # never overwritten while referenced
    assert all(torch.equal(a, c) for a, c in zip(whole.acts, whole_copy, strict=True))
    assert len(ptrs) <= _SPARE_BATCHES + len(views) + 2  # dropped batches' buffers were reused


def test_reiterating_same_loader_continues_the_stream(store):
    full = [torch.cat(b.acts, 1) for b in _epoch(_tokens(store, ["a", "b"], 10, seed=8), 40)]
    ld = _tokens(store, ["a", "b"], 10, seed=8, buffer_chunks=2, prefetch=1)
    ref = [
        torch.cat(b.acts, 1)
        for b in _epoch(_tokens(store, ["a", "b"], 10, seed=8, buffer_chunks=2, prefetch=1), 40)
    ]
    got = []
    for n in (3, 11, 1, 25):  # stop and restart; buffers of the stopped iteration are reused
        got += [torch.cat(b.acts, 1) for b in islice(iter(ld), n)]
    assert len(got) == 40 and all(torch.equal(x, y) for x, y in zip(ref, got, strict=True))
    assert not all(
        torch.equal(x, y) for x, y in zip(full, got, strict=True)
    )  # buffer_chunks matters


# ---------------------------------------------------------------- shuffle="images"
def _slow_image_stream(store, keys, bsz, images, seed, buffer_chunks, epoch):
    """The contract's image-granular stream of epoch `epoch`, with plain zarr row reads."""
    t = store.tokens_per_image
    stream = {k: [] for k in keys}
    for bi, imgs in enumerate(_reference_blocks(store, images, seed, buffer_chunks, epoch)):
        for p in np.random.default_rng([seed, 2, epoch, bi]).permutation(len(imgs)):
            for k in keys:
                stream[k].append(store.read_rows(k, imgs[p] * t, (imgs[p] + 1) * t))
    cat = {
        k: np.concatenate(v) if v else np.zeros((0, store.widths[k]), np.float16)
        for k, v in stream.items()
    }
    n = len(cat[keys[0]]) // bsz
    return [[cat[k][i * bsz : (i + 1) * bsz] for k in keys] for i in range(n)]


def _undirect(store):
    """Make the store read through zarr, as a store whose arrays are not raw (the pool fallback)."""
    store._direct = dict.fromkeys(store._direct, False)
    return store


def test_images_every_row_once_whole_images_in_order(store):
    held = np.zeros(50, bool)
    held[[0, 9, 25, 49]] = True
    ld = ChunkLoader(store, ["b", "a"], 16, images=~held, seed=3, buffer_chunks=2, shuffle="images")
    assert ld.reads_direct and ld.tokens_per_epoch == 252 and ld.batches_per_epoch == 15
    it = iter(ld)
    for e in range(2):
        batches = [next(it) for _ in range(15)]
        assert [(b.epoch, b.step) for b in batches] == [(e, i) for i in range(15)]
        ids_b = np.concatenate([_ids(b.acts[0]) for b in batches])
        ids_a = np.concatenate([_ids(b.acts[1]) for b in batches])
        np.testing.assert_array_equal(ids_a, ids_b)  # aligned across backbones
        # whole images, tokens contiguous and in order (an image may straddle two batches)
        per_img = ids_a.reshape(-1, 6)
        np.testing.assert_array_equal(per_img, per_img[:, :1] + np.arange(6))
        assert (per_img[:, 0] % 6 == 0).all()
        imgs = per_img[:, 0] // 6
        assert (
            len(set(imgs)) == 40 and not (held | ~store.valid)[imgs].any()
        )  # 42 selected, 2 in the dropped tail
        assert not np.array_equal(imgs, np.sort(imgs))  # shuffled
        for j, k in enumerate(["b", "a"]):
            got = np.concatenate([b.acts[j].numpy() for b in batches])
            np.testing.assert_array_equal(got, store.read_rows(k, 0, store.n_rows)[ids_a])
    ld.close()


def test_images_deterministic_and_not_the_token_stream(store):
    def ids(**kw):
        return [_ids(b.acts[0]) for b in _epoch(ChunkLoader(store, ["a"], 18, **kw))]

    a, b = ids(seed=5, shuffle="images"), ids(seed=5, shuffle="images", prefetch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(
        np.array_equal(x, y) for x, y in zip(a, ids(seed=6, shuffle="images"), strict=True)
    )
    assert not all(
        np.array_equal(x, y) for x, y in zip(a, ids(seed=5, shuffle="tokens"), strict=True)
    )
    with pytest.raises(ValueError, match="shuffle must be"):
        ChunkLoader(store, ["a"], 8, shuffle="rows")


@pytest.mark.parametrize("stop_at", [0, 5, 13, 14, 20])
def test_images_resume_equals_uninterrupted(store, stop_at):
    kw = dict(seed=2, buffer_chunks=3, shuffle="images")
    ref = ChunkLoader(store, ["a", "b"], 20, **kw)
    assert ref.batches_per_epoch == 13
    full = _epoch(ref, 26)
    ld = ChunkLoader(store, ["a", "b"], 20, **kw)
    got = _epoch(ld, stop_at)
    assert ld.state_dict() == {"epoch": stop_at // 13, "step": stop_at % 13}
    fresh = ChunkLoader(store, ["a", "b"], 20, **kw)
    fresh.load_state_dict(ld.state_dict())
    got += _epoch(fresh, 26 - stop_at)
    for x, y in zip(full, got, strict=True):
        assert (x.epoch, x.step) == (y.epoch, y.step)
        assert all(torch.equal(p, q) for p, q in zip(x.acts, y.acts, strict=True))


def test_images_rank_slices_concatenate_and_reiteration_continues(store):
    kw = dict(seed=4, buffer_chunks=2, shuffle="images")
    full = _epoch(ChunkLoader(store, ["a", "b"], 14, **kw), 30)
    parts = [
        _epoch(ChunkLoader(store, ["a", "b"], 14, rank=r, world_size=2, **kw), 30) for r in range(2)
    ]
    for g, r0, r1 in zip(full, *parts, strict=True):
        assert r0.acts[0].shape[0] == 7
        assert all(torch.equal(torch.cat([r0.acts[j], r1.acts[j]]), g.acts[j]) for j in range(2))
    ld, got = ChunkLoader(store, ["a", "b"], 14, **kw), []
    for n in (3, 11, 16):  # stop and restart the same loader
        got += list(islice(iter(ld), n))
    assert all(
        torch.equal(x.acts[j], y.acts[j]) for x, y in zip(full, got, strict=True) for j in range(2)
    )


def test_images_truncated_chunk_file_is_an_error(tmp_path):
    store = _make_store(tmp_path / "s.zarr", 20, 4, 5)
    with open(store.chunk_file("a", 2), "r+b") as f:
        f.truncate(10)
    with pytest.raises(StoreError, match="truncated"):
        for _ in ChunkLoader(store, ["a"], 8, buffer_chunks=1, shuffle="images"):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("usae-loader")]


def test_errors_in_a_gather_thread_reach_the_trainer(store, split_small_gathers, monkeypatch):
    real = loader_module.os.preadv

    def short_in_helpers(
        fd, bufs, offset, *flags
    ):  # a short read, as from a file cut while being read
        n = real(fd, bufs, offset, *flags)
        return n - 1 if threading.current_thread().name.startswith("usae-loader-gather") else n

    monkeypatch.setattr(loader_module.os, "preadv", short_in_helpers)
    with pytest.raises(StoreError, match="truncated"):
        for _ in ChunkLoader(store, ["a", "b"], 12, shuffle="images", gather_threads=2):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("usae-loader")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("shuffle", ["images", "tokens"])
def test_no_file_left_open(store, shuffle):
    before = len(os.listdir("/proc/self/fd"))
    ld = ChunkLoader(store, ["a", "b"], 12, shuffle=shuffle, buffer_chunks=2)
    it = iter(ld)
    for _ in range(ld.batches_per_epoch + 3):  # into the second epoch, chunks opened ahead
        next(it)
    assert (
        len(os.listdir("/proc/self/fd")) > before or shuffle == "tokens"
    )  # chunk files are open meanwhile
    ld.close()
    del it
    assert len(os.listdir("/proc/self/fd")) == before


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n_images=st.integers(1, 14),
    tpi=st.integers(1, 4),
    chunk=st.integers(1, 5),
    bsz=st.integers(1, 20),
    buffer_chunks=st.integers(1, 4),
    seed=st.integers(0, 99),
    direct=st.booleans(),
    threads=st.integers(1, 3),
    data=st.data(),
)
def test_property_images_match_slow_reference(
    tmp_path_factory,
    split_small_gathers,
    n_images,
    tpi,
    chunk,
    bsz,
    buffer_chunks,
    seed,
    direct,
    threads,
    data,
):
    valid = np.array(data.draw(st.lists(st.booleans(), min_size=n_images, max_size=n_images)))
    images = np.array(data.draw(st.lists(st.booleans(), min_size=n_images, max_size=n_images)))
    store = _make_store(tmp_path_factory.mktemp("p") / "s.zarr", n_images, tpi, chunk, valid)
    if not direct:
        _undirect(store)
    if int((valid & images).sum()) * tpi < bsz:
        return
    ws = data.draw(st.sampled_from([w for w in (1, 2, 3) if bsz % w == 0]))
    rank = data.draw(st.integers(0, ws - 1))
    ld = ChunkLoader(
        store,
        ["a", "b"],
        bsz,
        images=images,
        seed=seed,
        buffer_chunks=buffer_chunks,
        rank=rank,
        world_size=ws,
        shuffle="images",
        gather_threads=threads,
    )
    assert ld.read_mode == ("pread" if direct else "pool")
    _assert_two_epochs_match(
        ld, lambda e: _slow_image_stream(store, ["a", "b"], bsz, images, seed, buffer_chunks, e)
    )


def test_images_direct_reads_need_no_chunk_pool(tmp_path):
    widths = {"a": 64, "b": 96}
    big = _make_store(tmp_path / "b.zarr", 800, 16, 10, widths=widths)
    chunk_bytes, batch_bytes = 10 * 16 * 160 * 2, 64 * 160 * 2
    peak = _peak_bytes(big, shuffle="images", buffer_chunks=3)
    assert peak < chunk_bytes + 12 * batch_bytes + 64 * 1024, (
        peak
    )  # a few batches, never a chunk pool


def test_train_end_to_end_with_image_batches(tmp_path):
    import json

    from typer.testing import CliRunner

    from usae.cli import app

    store = _make_store(tmp_path / "s.zarr", 40, 4, 5, widths={"a": 6, "b": 8})
    args = [
        "train",
        "--store",
        str(store.path),
        "--out",
        str(tmp_path / "r"),
        "--batch-tokens",
        "24",
        "--steps",
        "6",
        "--concepts",
        "16",
        "--k",
        "2",
        "--holdout",
        "0.2",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--log-every",
        "2",
        "--warmup-steps",
        "1",
        "--shuffle",
        "images",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["shuffle"] == "images"
    bad = CliRunner().invoke(app, [*args[:3], "--out", str(tmp_path / "x"), "--shuffle", "pixels"])
    assert bad.exit_code == 2 and "'pixels' is not one of 'images', 'tokens'" in bad.output


def test_images_batch_buffers_never_overwritten_while_referenced(store):
    ld = ChunkLoader(store, ["a", "b"], 8, seed=0, shuffle="images")
    ref = [
        [a.clone() for a in b.acts]
        for b in _epoch(ChunkLoader(store, ["a", "b"], 8, seed=0, shuffle="images"), 60)
    ]
    kept, ptrs = {}, set()
    for n, b in enumerate(islice(iter(ld), 60)):
        ptrs.add(b.acts[1].data_ptr())
        if n % 9 == 0:
            kept[n] = b.acts[1][1:6]  # a view keeps the buffer alive
        if n == 4:
            whole = b
    assert all(torch.equal(v, ref[n][1][1:6]) for n, v in kept.items())
    assert all(torch.equal(a, r) for a, r in zip(whole.acts, ref[4], strict=True))
    assert len(ptrs) <= len(kept) + 4  # dropped batches' buffers were reused


def _share_in_threads(share, fn, n_threads: int) -> None:
    """Run share.work(fn) in n_threads threads beside this one, then wait like the batcher."""
    threads = [threading.Thread(target=share.work, args=(fn,)) for _ in range(n_threads)]
    for t in threads:
        t.start()
    try:
        share.work(fn)
        share.wait()
    finally:
        for t in threads:
            t.join()


@pytest.mark.parametrize("n_threads", [0, 1, 3])
def test_shared_units_each_done_once_before_wait_returns(n_threads):
    done, by = [], set()
    started = threading.Barrier(n_threads + 1) if n_threads else None

    def unit(i):
        if started is not None and i < n_threads + 1:  # every thread takes one unit before any ends
            started.wait(timeout=10)
        done.append(i)
        by.add(threading.get_ident())

    share = loader_module._Share([(i,) for i in range(200)])
    _share_in_threads(share, unit, n_threads)
    assert sorted(done) == list(range(200))
    assert len(by) == n_threads + 1


def test_shared_units_stop_at_the_first_error_and_wait_raises_it():
    ran = []

    def unit(i):
        ran.append(i)
        if i == 5:
            raise StoreError("unit 5 failed")

    share = loader_module._Share([(i,) for i in range(100)])
    with pytest.raises(StoreError, match="unit 5"):
        _share_in_threads(share, unit, 2)
    assert (
        5 in ran and len(ran) < 100
    )  # no unit is taken once one has failed (a few may be in flight)


@pytest.mark.parametrize("drop", [True, False])
def test_a_trainer_faster_than_the_loader_gets_its_dropped_buffer_back(store, monkeypatch, drop):
    """A trainer waiting for each batch that drops it before asking for the next gets the same
    (cache-warm) buffers back every time; one that still holds it gets the other set, and the
    batch it holds is never overwritten."""
    ref = [
        [a.clone() for a in b.acts]
        for b in _epoch(ChunkLoader(store, ["a", "b"], 8, seed=3, shuffle="images"), 12)
    ]
    real = loader_module._Workers._copy

    def slow_copy(self, *args):  # the loader is the slower side: the trainer always waits for it
        threading.Event().wait(0.002)
        return real(self, *args)

    monkeypatch.setattr(loader_module._Workers, "_copy", slow_copy)
    monkeypatch.setattr(
        loader_module, "_AGAIN_S", 30.0
    )  # however late the trainer's next request comes
    it = iter(ChunkLoader(store, ["a", "b"], 8, seed=3, shuffle="images", gather_threads=1))
    ptrs, held = [], None
    for n in range(12):
        b = next(it)
        ptrs.append(b.acts[0].data_ptr())
        assert all(torch.equal(a, r) for a, r in zip(b.acts, ref[n], strict=True))
        if held is not None:
            assert all(torch.equal(a, r) for a, r in zip(held.acts, ref[n - 1], strict=True))
        held = None if drop else b
        del b
    assert len(set(ptrs)) == (1 if drop else 2)
