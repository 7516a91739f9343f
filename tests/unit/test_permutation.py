"""Permutation: a true bijection on [0, N) for every N, deterministic per (seed, epoch), O(batch) memory."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp_toolkit.permutation import Permutation

EDGE_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33, 64, 65, 127, 257, 1000, 1023, 1024, 1025, 4097,
              65537, 100_003, 2**20 + 1]


def _image(n: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    return Permutation(n, seed, epoch)(np.arange(n))


@pytest.mark.parametrize("n", EDGE_SIZES)
def test_bijection_for_edge_sizes(n: int) -> None:
    image = _image(n, seed=12345, epoch=3)
    assert image.dtype == np.int64
    assert np.array_equal(np.sort(image), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**63), epoch=st.integers(0, 1000))
def test_bijection_property(n: int, seed: int, epoch: int) -> None:
    assert np.array_equal(np.sort(_image(n, seed, epoch)), np.arange(n))


def test_deterministic_and_keyed_by_seed_and_epoch() -> None:
    base = _image(1000, seed=7, epoch=0)
    assert np.array_equal(base, _image(1000, seed=7, epoch=0))
    assert not np.array_equal(base, _image(1000, seed=7, epoch=1))
    assert not np.array_equal(base, _image(1000, seed=8, epoch=0))
    assert not np.array_equal(base, np.arange(1000))


def test_getitem_matches_call_and_accepts_negative_positions() -> None:
    perm = Permutation(101, seed=3)
    image = perm(np.arange(101))
    assert [perm[i] for i in range(101)] == image.tolist()
    assert perm[-1] == image[-1]
    assert len(perm) == 101
    with pytest.raises(IndexError):
        perm[101]
    with pytest.raises(IndexError):
        perm[-102]


def test_call_keeps_shape_accepts_any_int_dtype_and_checks_range() -> None:
    perm = Permutation(50, seed=1)
    grid = np.arange(50, dtype=np.int32).reshape(5, 10)
    assert perm(grid).shape == (5, 10)
    assert np.array_equal(perm(grid).ravel(), perm(np.arange(50, dtype=np.uint64)))
    assert perm(np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(IndexError):
        perm(np.array([0, 50]))
    with pytest.raises(IndexError):
        perm(np.array([-1]))
    with pytest.raises(TypeError):
        perm(np.array([0.5]))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Permutation(0)
    with pytest.raises(ValueError):
        Permutation(10, seed=-1)


@pytest.mark.parametrize("n", [2**40 + 3, 2**62 + 5])
def test_huge_domain_stays_in_range_and_injective(n: int) -> None:
    positions = np.concatenate([np.arange(50_000), n - 1 - np.arange(50_000)]).astype(np.int64)
    image = Permutation(n, seed=9)(positions)
    assert image.min() >= 0 and image.max() < n
    assert len(np.unique(image)) == len(positions)


def test_first_position_is_spread_over_the_domain() -> None:
    counts = np.bincount([Permutation(8, seed=s)[0] for s in range(800)], minlength=8)
    assert counts.min() > 50 and counts.max() < 150, counts
