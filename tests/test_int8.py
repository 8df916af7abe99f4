"""int8 stores: quantise -> write -> read -> dequantise within half a scale step of every
element, statistics exact (those of the float16 rows), and the loader's dequantised batches
equal to the reference dequantisation of the rows it delivers, in the float16 loader's order."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as hst
from usae.pipeline.store import (
    BackboneLayout,
    RunningStats,
    Store,
    StoreError,
    convert_store,
    quantize_int8,
)
from usae.trainer.loader import ChunkLoader


def _write(
    path: Path, x: dict[str, np.ndarray], n: int, t: int, chunk: int, dtype: str, valid=None
) -> Store:
    st = Store.create(
        path,
        [f"i{i}" for i in range(n)],
        [BackboneLayout(k, v.shape[1]) for k, v in x.items()],
        grid=(1, t),
        chunk_images=chunk,
        source="synth",
        fingerprint_of={"n": n},
        store_dtype=dtype,
    )
    valid = np.ones(n, bool) if valid is None else valid
    for c in range(st.n_chunks):
        (r0, r1), (a, b) = st.chunk_rows(c), st.chunk_images_range(c)
        st.write_chunk(c, {k: v[r0:r1] for k, v in x.items()}, valid[a:b])
    st.finalize()
    return Store.open(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=hst.integers(1, 9),
    t=hst.integers(1, 5),
    chunk=hst.integers(1, 4),
    d=hst.integers(1, 7),
    scale=hst.floats(1e-3, 1e3),
    seed=hst.integers(0, 2**16),
    zero_channel=hst.booleans(),
    outlier=hst.floats(1, 1e3),
)
@example(n=6, t=5, chunk=2, d=5, scale=85.0, seed=290, zero_channel=False, outlier=1.0)
def test_int8_round_trip_within_half_a_step_and_exact_stats(
    n, t, chunk, d, scale, seed, zero_channel, outlier
):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n * t, d)) * scale * rng.uniform(0.1, 2, d)
    x[rng.integers(n * t), rng.integers(d)] *= outlier  # a massive activation
    if zero_channel:
        x[:, 0] = 0
    x16 = np.clip(x, -6e4, 6e4).astype(np.float16)  # finite float16
    valid = rng.random(n) > 0.2
    with tempfile.TemporaryDirectory() as tmp:
        a = _write(Path(tmp) / "a.zarr", {"k": x16}, n, t, chunk, "float16", valid)
        q = _write(Path(tmp) / "q.zarr", {"k": x16}, n, t, chunk, "int8", valid)
        assert q.dtypes["k"] == np.int8 and q.store_dtype == "int8"
        assert q.stats("k") == a.stats("k")  # exact: of the unquantised rows
        scales = q.scales("k")
        for c in range(q.n_chunks):
            r0, r1 = q.chunk_rows(c)
            ref = x16[r0:r1].astype(np.float32)
            s = scales[c]
            np.testing.assert_array_equal(s, np.abs(ref).max(0) / 127)  # the chunk's absmax
            got = q.read_chunk("k", c)
            assert got.dtype == np.float32
            # half a step in exact arithmetic, plus the float32 rounding of code * scale (an
            # element exactly half-way, x / scale = 63.5, is a full half step from its code)
            assert (np.abs(got - ref) <= s / 2 * (1 + 1e-6) + np.spacing(np.abs(got))).all()
            codes = q.read_chunk("k", c, codes=True)
            assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
            np.testing.assert_array_equal(q.map_chunk("k", c), codes)
            np.testing.assert_array_equal(got, codes * s)
        np.testing.assert_array_equal(
            q.read_rows("k", 0, q.n_rows),
            np.concatenate([q.read_chunk("k", c) for c in range(q.n_chunks)]),
        )
        # converting the float16 store gives the same store
        v = convert_store(a.path, Path(tmp) / "v.zarr")
        np.testing.assert_array_equal(v.scales("k"), scales)
        assert v.stats("k") == a.stats("k")
        for c in range(q.n_chunks):
            np.testing.assert_array_equal(
                v.read_chunk("k", c, codes=True), q.read_chunk("k", c, codes=True)
            )


def test_non_finite_channel_dequantises_non_finite():
    x = np.ones((4, 3), np.float16)
    x[1, 2] = np.nan
    q, s = quantize_int8(x)
    assert np.isfinite(s[:2]).all() and not np.isfinite(s[2])
    deq = q * s
    assert np.isfinite(deq[:, :2]).all() and not np.isfinite(deq[:, 2]).any()
    st = RunningStats.of(x)
    assert not np.isfinite(st.mean[2])


def test_int8_fingerprint_differs_and_bad_dtype_refused(tmp_path):
    x = {"k": np.ones((8, 2), np.float16)}
    a = _write(tmp_path / "a.zarr", x, 4, 2, 2, "float16")
    q = _write(tmp_path / "q.zarr", x, 4, 2, 2, "int8")
    assert a.attrs["fingerprint"] != q.attrs["fingerprint"]
    with pytest.raises(StoreError, match="no scales"):
        a.scales("k")
    with pytest.raises(StoreError, match="store dtype"):
        Store.create(
            tmp_path / "b.zarr",
            ["a"],
            [BackboneLayout("k", 2)],
            grid=(1, 1),
            chunk_images=1,
            source="synth",
            fingerprint_of={},
            store_dtype="int4",
        )


@pytest.mark.parametrize("shuffle", ["images", "tokens"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_loader_dequantised_batches_equal_reference(tmp_path, shuffle, device):
    """Rows are unique, so each batch row of the float16 loader names its store row; the int8
    loader (same seed) yields the same rows in the same order, each equal to the reference
    dequantisation (its chunk's codes times its chunk's scales) and tagged with its chunk."""
    n, t, chunk = 40, 6, 7
    rng = np.random.default_rng(0)
    x = {
        "a": (rng.standard_normal((n * t, 5)) * 3).astype(np.float16),
        "b": (rng.standard_normal((n * t, 9)) * 0.2 + 1).astype(np.float16),
    }
    valid = np.ones(n, bool)
    valid[[3, 17]] = False
    f16 = _write(tmp_path / "f.zarr", x, n, t, chunk, "float16", valid)
    q8 = convert_store(f16.path, tmp_path / "q.zarr")
    ref = {}
    for k in x:
        s = q8.scales(k)
        ref[k] = np.concatenate(
            [q8.read_chunk(k, c, codes=True).astype(np.float32) * s[c] for c in range(q8.n_chunks)]
        )
    where = {x["a"][r].tobytes() + x["b"][r].tobytes(): r for r in range(n * t)}
    assert len(where) == n * t
    held = np.zeros(n, bool)
    held[::5] = True
    kw = dict(images=~held, seed=4, shuffle=shuffle, buffer_chunks=2)
    with (
        ChunkLoader(f16, ["a", "b"], 30, **kw) as l16,
        ChunkLoader(q8, ["a", "b"], 30, device=device, **kw) as l8,
    ):
        assert l8.int8 and not l16.int8
        for b16, b8 in zip(iter(l16), iter(l8), strict=False):
            rows = np.array(
                [
                    where[u.tobytes() + v.tobytes()]
                    for u, v in zip(b16.acts[0].numpy(), b16.acts[1].numpy(), strict=True)
                ]
            )
            assert (b16.epoch, b16.step) == (b8.epoch, b8.step)
            np.testing.assert_array_equal(b8.chunks.numpy(), rows // (chunk * t))
            for j, k in enumerate(["a", "b"]):
                assert b8.acts[j].dtype == torch.float32
                np.testing.assert_array_equal(b8.acts[j].numpy(), ref[k][rows])
            if b16.epoch == 2:
                break


def test_extract_writes_an_int8_store_with_the_fp16_statistics(shared_image_set, tmp_path):
    """usae extract --store-dtype int8: the same exact statistics as the float16 store of the same
    images, the rows within half a scale step of them."""
    from usae.pipeline.extract import ExtractConfig, run_extract
    from usae.pipeline.store import Store

    common = dict(manifest=shared_image_set.manifest, backbones=("dinov2",), tiny=True, random_init=True,
                  progress=False, chunk_images=4)  # fmt: skip
    run_extract(ExtractConfig(store=tmp_path / "f16.zarr", **common))
    run_extract(ExtractConfig(store=tmp_path / "i8.zarr", store_dtype="int8", **common))
    a, b = Store.open(tmp_path / "f16.zarr"), Store.open(tmp_path / "i8.zarr")
    assert b.store_dtype == "int8" and a.store_dtype == "float16"
    assert np.array_equal(a.stats("dinov2")["mean"], b.stats("dinov2")["mean"])
    for c in range(a.n_chunks):
        x, y = a.read_chunk("dinov2", c).astype(np.float32), b.read_chunk("dinov2", c)
        step = np.abs(x).max(0) / 127
        assert np.all(np.abs(x - y) <= step / 2 + 1e-6)
