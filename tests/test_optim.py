"""RowAdamW (trainer/state.py): the same updates as a slow obvious loop over rows and
coordinates; AdamW exactly where every moment is per coordinate; and the property it exists
for: trained on rotated data, a USAE's encoder and decoder rows are the rotated ones."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from usae.trainer.state import RowAdamW


def _slow_step(p, g, state, kind, lr, b1, b2, eps, wd):
    """One RowAdamW step of one parameter, element by element in float64."""
    t = state["t"] = state.get("t", 0) + 1
    m = state.setdefault("m", torch.zeros_like(p))
    v = state.setdefault("v", {})
    rows = p.shape[0] if p.dim() == 2 else 1
    out = p.clone()
    for r in range(rows):
        pr, gr = (p[r], g[r]) if p.dim() == 2 else (p, g)
        if kind == "row" or kind == "all":
            mean_g2 = sum(float(x) ** 2 for x in gr.flatten()) / gr.numel()
            v[(r,)] = b2 * v.get((r,), 0.0) + (1 - b2) * mean_g2
        for c in range(pr.numel()):
            idx = (r, c) if p.dim() == 2 else (c,)
            gi = float(g[idx])
            m[idx] = b1 * float(m[idx]) + (1 - b1) * gi
            if kind == "coord":
                v[idx] = b2 * v.get(idx, 0.0) + (1 - b2) * gi * gi
                vi = v[idx]
            else:
                vi = v[(r,)]
            mh, vh = float(m[idx]) / (1 - b1**t), vi / (1 - b2**t)
            out[idx] = float(p[idx]) * (1 - lr * wd) - lr * mh / (math.sqrt(vh) + eps)
    return out


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 4), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_rowadamw_matches_slow_loop(rows, d, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"row": (rows, d), "all": (d,), "coord": (rows, d)}
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    ps = [torch.nn.Parameter(v.clone()) for v in params.values()]
    opt = RowAdamW([{"params": ps, "moments": list(shapes)}], lr=0.01, weight_decay=0.1)
    slow = {k: {} for k in shapes}
    ref = {k: v.clone() for k, v in params.items()}
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for (k, v), g in zip(ref.items(), grads, strict=True):
            ref[k] = _slow_step(v, g, slow[k], k, 0.01, 0.9, 0.999, 1e-8, 0.1)
    for p, v in zip(ps, ref.values(), strict=True):
        torch.testing.assert_close(p.detach(), v, rtol=1e-10, atol=1e-12)


def test_rowadamw_per_coordinate_is_adamw():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = RowAdamW([{"params": [a]}], lr=0.01, weight_decay=0.1)
    ob = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer, equivariant", [("rowadamw", True), ("adamw", False)])
def test_training_in_a_rotated_basis_gives_the_rotated_model(tmp_path, optimizer, equivariant):
    """A USAE trained on x and one trained on x @ Q (same start mapped by Q, same batches):
    with RowAdamW and an L2 loss the second's rows stay the first's times Q; AdamW's do not."""
    from usae.trainer.model import USAE, ModelSpec
    from usae.trainer.objective import source_loss
    from usae.trainer.state import make_optimizer
    from usae.trainer.train import TrainConfig

    torch.manual_seed(0)
    d, m, n = 12, 16, 64
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    spec = ModelSpec(("a",), (d,), (0.0,), (1.0,), m, 3, decoder_init="unit", gains=True,
                     decoder_bias=True)  # fmt: skip
    one = USAE(spec).double().train()
    two = USAE(spec).double().train()
    two.load_state_dict(one.state_dict())
    with torch.no_grad():
        two.encoders[0].weight.copy_(one.encoders[0].weight @ q)
        two.decoders[0].copy_(one.decoders[0] @ q)
        one.dec_bias[0].copy_(torch.randn(d, dtype=torch.float64))
        two.dec_bias[0].copy_(one.dec_bias[0] @ q)
    cfg = TrainConfig(lr=1e-2, weight_decay=1e-3, optimizer=optimizer)
    opts = [make_optimizer(one, cfg), make_optimizer(two, cfg)]
    for _ in range(30):
        x = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.2, 2, d, dtype=torch.float64)
        for model, opt, xx in ((one, opts[0], x), (two, opts[1], x @ q)):
            opt.zero_grad()
            source_loss(model, 0, [xx], [0], loss="l2", aux_weight=0.1).loss.backward()
            opt.step()
    with torch.no_grad():
        err = max(
            (one.decoders[0] @ q - two.decoders[0]).abs().max(),
            (one.encoders[0].weight @ q - two.encoders[0].weight).abs().max(),
            (one.dec_bias[0] @ q - two.dec_bias[0]).abs().max(),
        )
    assert (err < 1e-8) == equivariant, float(err)


def test_whitening_turns_an_invertible_map_into_a_rotation():
    """x and x @ A whitened by their own `whitening_matrix`: x' P' = x P R with R orthogonal
    (exactly without the ridge; near it with the default ridge on well-conditioned data)."""
    import numpy as np
    from usae.trainer.inputs import whitening_matrix
    from usae.trainer.synth import random_map

    gen = torch.Generator().manual_seed(0)
    d = 10
    skew = torch.randn(4000, d, generator=gen, dtype=torch.float64) @ torch.randn(
        d, d, generator=gen, dtype=torch.float64
    )
    a = torch.from_numpy(random_map(np.random.default_rng(1), d, "affine", 0.8))
    iso = torch.randn(4000, d, generator=gen, dtype=torch.float64)
    for x, eps, tol in ((skew, 0.0, 1e-8), (iso, 1e-2, 0.2)):
        p, p2 = whitening_matrix(x, eps), whitening_matrix(x @ a, eps)
        torch.testing.assert_close(p, p.T)
        r = torch.linalg.solve(p, a @ p2)  # x' P' = x P R  <=>  R = P^-1 A P'
        torch.testing.assert_close(x @ a @ p2, x @ p @ r)
        assert (r @ r.T - torch.eye(d, dtype=torch.float64)).abs().max() < tol
        if eps == 0:
            w = x @ p
            torch.testing.assert_close(w.T @ w / len(w), torch.eye(d, dtype=torch.float64))


def test_whitened_model_start_and_round_trip(tmp_path):
    """The data-aligned start of a whitened model: encoder rows = whitened token, decoder rows =
    the token itself; the whitening is saved and loaded with the weights."""
    from usae.trainer.model import USAE, ModelSpec

    spec = ModelSpec(("a",), (6,), (0.0,), (1.0,), 8, 2, decoder_init="data", whiten=True)
    model = USAE(spec)
    q = torch.randn(6, 6)
    p = q @ q.T + torch.eye(6)
    model.white_0.copy_(p)
    x = torch.randn(5, 6)
    model.seed_from_tokens([model.encoder_input(0, x)])
    torch.testing.assert_close(
        model.decoders[0][:5], torch.nn.functional.normalize(x, dim=1), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        model.encoders[0].weight[:5], torch.nn.functional.normalize(x @ p, dim=1)
    )
    model.save(tmp_path / "w.safetensors")
    back = USAE.load(spec, tmp_path / "w.safetensors")
    torch.testing.assert_close(back.white_0, p)
