"""Tests written to kill mutants that survived `benchmarks/mutation.py` (see tests/README.md)."""

from __future__ import annotations

import numpy as np
import pytest

from ddp_toolkit.permutation import Permutation


@pytest.mark.parametrize(("seed", "epoch"), [(-1, 0), (0, -1)])
def test_permutation_refuses_a_negative_seed_or_epoch_alone(seed: int, epoch: int) -> None:
    with pytest.raises(ValueError, match="must be non-negative"):
        Permutation(10, seed=seed, epoch=epoch)


def test_permutation_order_is_pinned() -> None:
    # The order of (n, seed, epoch) is the global data order of every run: a checkpoint written by one version
    # resumes in another only if it is unchanged. These values were computed once, by this version, on purpose.
    assert [Permutation(10)[i] for i in range(10)] == [2, 4, 9, 6, 3, 0, 5, 1, 8, 7]
    assert Permutation(1000, seed=7, epoch=2)(np.arange(0, 1000, 97)).tolist() == [
        788, 843, 332, 799, 648, 815, 656, 885, 293, 191, 749]
    assert Permutation(2**40 + 3, seed=1)(np.array([0, 1, 2**40 + 2])).tolist() == [
        656781337737, 958107476057, 697149068122]
