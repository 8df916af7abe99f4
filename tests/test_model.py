"""USAE model API (docs/contracts.md): standardise, encode, sparse decode vs dense, load_run."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from safetensors.torch import save_file
from usae.trainer.checkpoint import CheckpointError
from usae.trainer.model import STD_EPS, USAE, ModelSpec, load_run

torch.set_num_threads(1)


def spec(independent=False, m=20, k=4):
    return ModelSpec(("a", "b"), (5, 7), (0.5, -1.0), (2.0, 3.0), m, k, independent)


@settings(max_examples=30, deadline=None)
@given(
    widths=hst.lists(hst.integers(1, 9), min_size=1, max_size=4),
    m=hst.integers(1, 50),
    k=hst.integers(1, 50),
    ind=hst.booleans(),
    mu=hst.floats(-5, 5),
    sigma=hst.floats(0.01, 5),
)
def test_spec_json_round_trip(widths, m, k, ind, mu, sigma):
    n = len(widths)
    s = ModelSpec(
        tuple(f"k{i}" for i in range(n)), tuple(widths), (mu,) * n, (sigma,) * n, m, k, ind
    )
    assert ModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_standardize_uses_scalar_stats():
    model = USAE(spec())
    a = torch.randn(3, 7)
    assert torch.allclose(model.standardize(1, a), (a + 1.0) / (3.0 + STD_EPS))


def test_encode_decode_match_dense_math():
    torch.manual_seed(0)
    model = USAE(spec()).train()
    x = torch.randn(16, 5)
    codes = model.encode(0, x)
    pre = model.bns[0](model.encoders[0](x))  # second BN call in train mode: same batch statistics
    assert torch.allclose(codes.pre_bm, pre, atol=1e-6)
    dense = torch.relu(pre)
    kth = dense.topk(4, dim=1).values[:, -1:]
    z = model.dense_codes(codes)
    assert torch.allclose(z, torch.where(dense >= kth, dense, 0), atol=1e-6)
    assert (z > 0).sum(1).le(4).all()
    for j in range(2):
        d = model.decoder_weight(j)
        assert torch.allclose(d.norm(dim=1), torch.ones(20), atol=1e-6)
        assert torch.allclose(model.decode(j, codes), z @ d, atol=1e-5)


def test_decoder_gradient_flows_through_normalisation():
    model = USAE(spec())
    w = model.decoder_weight(0)
    (w[0] * torch.ones(5)).sum().backward()
    g = model.decoders[0].grad
    assert g is not None and g[0].abs().sum() > 0
    # scaling a raw row does not change the normalised row: gradient orthogonal to it
    assert torch.allclose(
        (g[0] * model.decoders[0][0].detach()).sum(), torch.tensor(0.0), atol=1e-5
    )


@pytest.mark.parametrize("independent", [False, True])
def test_forward_targets(independent):
    model = USAE(spec(independent)).eval()
    codes, outs = model(1, torch.randn(6, 7))
    assert outs[1] is not None and outs[1].shape == (6, 7)
    assert (outs[0] is None) == independent


def test_load_run_round_trip_and_errors(tmp_path):
    torch.manual_seed(1)
    model = USAE(spec()).eval()
    (tmp_path / "config.json").write_text(
        json.dumps({"schema_version": 1, "model": model.spec.to_dict()})
    )
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    again, cfg = load_run(tmp_path)
    x = torch.randn(8, 5)
    assert torch.equal(again.decode(1, again.encode(0, x)), model.decode(1, model.encode(0, x)))
    assert cfg["model"]["concepts"] == 20 and not again.training
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_run(tmp_path / "nothing")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_run(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_run(tmp_path)
