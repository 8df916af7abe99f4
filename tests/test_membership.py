"""analysis.membership: per-model statistics -> member sets (gain rule, energy rule, fire veto)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from usae.analysis.membership import member_matrix


def test_gain_rule_and_fire_veto():
    gain = np.array([[1.0, 1.0, 0.0, 2.0, 0.3],
                     [0.5, 0.01, 1.0, 1.9, 0.3],
                     [0.3, 0.02, 1.0, 0.5, 0.3]])
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
    np.testing.assert_array_equal(member_matrix(fires, energy, energy_ratio=0.05), [[1, 1, 1], [1, 1, 1]])


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
        np.testing.assert_array_equal(mem, member_matrix(fires * 3, energy * 7, None if g is None else g * 5))
