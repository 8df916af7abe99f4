"""analysis.membership: per-model statistics -> member sets (gain rule, energy rule, fire veto)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from usae.analysis.membership import member_matrix


def test_gain_rule_and_fire_veto():
    gain = np.array(
        [[1.0, 1.0, 0.0, 2.0, 0.3], [0.5, 0.01, 1.0, 1.9, 0.3], [0.3, 0.02, 1.0, 0.5, 0.3]]
    )
    fires = np.full((3, 5), 100.0)
    fires[2, 3] = 0.0  # never fires in model 2: vetoed whatever its gain
    fires[:, 4] = 0.0  # dead concept: lives nowhere
    energy = np.ones((3, 5))
    got = member_matrix(fires, energy, gain, fire_ratio=0.02)
    want = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [1, 0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(got, want)
    want[2, 3] = True  # default: no fire veto (a member may fire through a duplicate concept)
    np.testing.assert_array_equal(member_matrix(fires, energy, gain), want)


def test_energy_rule_without_gains():
    energy = np.array([[1.0, 0.1, 0.5], [0.9, 1.0, 0.05]])
    fires = np.ones((2, 3))
    np.testing.assert_array_equal(member_matrix(fires, energy), [[1, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(
        member_matrix(fires, energy, energy_ratio=0.05), [[1, 1, 1], [1, 1, 1]]
    )


def test_shapes_checked():
    with pytest.raises(ValueError):
        member_matrix(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        member_matrix(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 20), st.integers(0, 10_000))
def test_properties(n_models, m, seed):
    rng = np.random.default_rng(seed)
    fires = rng.integers(0, 50, (n_models, m)).astype(float)
    energy, gain = rng.random((n_models, m)), rng.random((n_models, m))
    for g in (None, gain):
        mem = member_matrix(fires, energy, g)
        assert mem.shape == (n_models, m) and mem.dtype == bool
        live = fires.max(0) > 0
        assert not mem[:, ~live].any()
        score = energy if g is None else g
        # every live concept lives at least in the model where it is strongest (if it fires there)
        top = score.argmax(0)
        assert mem[top[live], np.arange(m)[live]].all()
        # scale invariance per concept
        np.testing.assert_array_equal(
            mem, member_matrix(fires * 3, energy * 7, None if g is None else g * 5)
        )


# ---------------------------------------------------------------- labels, duplicates, twins
def test_member_labels():
    from usae.analysis.membership import member_labels

    members = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], bool)
    assert member_labels(members, ["a", "b", "c"]) == ["all", "a", "b", ""]


def slow_duplicates(decoders, members, fires, cosine=0.9):
    """Every pair written out: mean cosine over the models where both live, firing profiles."""
    m = members.shape[1]
    prof = fires / np.maximum(fires.sum(0, keepdims=True), 1)
    out = []
    for a in range(m):
        for b in range(a + 1, m):
            both = [i for i in range(len(decoders)) if members[i, a] and members[i, b]]
            if not both or fires[:, a].sum() == 0 or fires[:, b].sum() == 0:
                continue
            cos = np.mean(
                [
                    decoders[i][a]
                    @ decoders[i][b]
                    / np.linalg.norm(decoders[i][a])
                    / np.linalg.norm(decoders[i][b])
                    for i in both
                ]
            )
            if cos >= cosine and np.minimum(prof[:, a], prof[:, b]).sum() < 0.5:
                out.append((a, b))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 40), block=st.integers(1, 16))
def test_duplicates_match_slow(seed, m, block):
    from usae.analysis.membership import duplicates

    rng = np.random.default_rng(seed)
    dec = [rng.normal(size=(m, 6)) for _ in range(3)]
    for a, b in rng.integers(0, m, size=(m // 3, 2)):  # some concepts learned twice
        for d in dec:
            d[b] = d[a] * rng.uniform(0.5, 2) + 0.05 * rng.normal(size=6)
    members = rng.random((3, m)) < 0.8
    fires = rng.integers(0, 50, size=(3, m)).astype(float) * (rng.random((3, m)) < 0.6)
    got = [tuple(p) for p in duplicates(dec, members, fires, block=block).tolist()]
    assert got == slow_duplicates(dec, members, fires)


def test_duplicate_firing_from_different_models_is_found():
    from usae.analysis.membership import duplicates

    rng = np.random.default_rng(0)
    dec = [rng.normal(size=(4, 8)) for _ in range(2)]
    for d in dec:
        d[3] = d[1]  # concept 3 is concept 1 again
        d[2] = d[0]  # concept 2 is concept 0 again, but fires from the same model as 0
    fires = np.array(
        [[10, 10, 10, 0], [0, 0, 0, 10]], float
    )  # 1 fires from model 0, 3 from model 1
    members = np.ones((2, 4), bool)
    assert duplicates(dec, members, fires).tolist() == [[1, 3]]
