"""Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) from data-parallel grads.

Each iteration gives two gradient norms for free: a rank's local gradient over B_small = b·k samples (measured
before the all-reduce, e.g. in a DDP communication hook) and the all-reduced gradient over B_big = B samples.
Since E|G_B|² = |G|² + tr(Σ)/B for a batch of B samples drawn with replacement, two batch sizes give
unbiased estimates of |G|² and tr(Σ); each is smoothed by a bias-corrected EMA before taking the ratio.

Pitfalls:
- Samples drawn without replacement from a finite set of N (one epoch's shards are disjoint) bias the
  |G|² estimate by −tr(Σ)/(N−1) and tr(Σ) by a factor N/(N−1): negligible unless N is small.
- A single iteration's estimate is very noisy (|G|² is often negative); only the smoothed ratio is useful,
  and only once |G|² is clearly positive. The ratio of EMAs is itself slightly biased.
- It needs two different batch sizes: W >= 2 ranks, or with W = 1 two groups of micro-batches.
- Pass the mean over ranks of the local squared norms as small_sq_norm: same expectation, lower variance.
- Both norms are of mean gradients. With a loss normalised by the global count B, a rank's gradient
  before the all-reduce is (B_small/B)·G_small: multiply it by B/B_small before squaring.
- Read the gradients before `optimizer.step()`: some optimizers (pytorch_optimizer's LARS) modify them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["NoiseScaleEstimator", "unbiased_estimates"]


def unbiased_estimates(
    small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """Unbiased (|G|², tr(Σ)) from squared norms of mean gradients over b_small and b_big samples.

    |G|² ≈ (B_big·|G_big|² − B_small·|G_small|²)/(B_big − B_small),
    tr(Σ) ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big).
    """
    for name, value in (("small_sq_norm", small_sq_norm), ("big_sq_norm", big_sq_norm)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (0 < b_small < b_big):
        raise ValueError(f"need 0 < b_small < b_big, got b_small {b_small!r} and b_big {b_big!r} "
                         "(noise scale needs W >= 2 ranks or two micro-batch groups)")
    gradient_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return gradient_sq, trace_sigma


class NoiseScaleEstimator:
    """Bias-corrected EMAs of the unbiased |G|² and tr(Σ) estimates, and their ratio B_simple."""

    def __init__(self, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.steps = 0
        self._ema_gradient_sq = 0.0
        self._ema_trace_sigma = 0.0

    def update(self, small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> None:
        """Add one iteration: mean over ranks of local |G_small|² (b_small = b·k each) and global |G_big|²."""
        gradient_sq, trace_sigma = unbiased_estimates(small_sq_norm, big_sq_norm, b_small, b_big)
        self._ema_gradient_sq = self.beta * self._ema_gradient_sq + (1.0 - self.beta) * gradient_sq
        self._ema_trace_sigma = self.beta * self._ema_trace_sigma + (1.0 - self.beta) * trace_sigma
        self.steps += 1

    def _debiased(self, ema: float) -> float | None:
        # EMA started at 0: dividing by 1 − β^t makes it an average of the inputs (Adam's bias correction).
        if self.steps == 0:
            return None
        return ema / (1.0 - self.beta**self.steps)

    @property
    def gradient_sq(self) -> float | None:
        """Smoothed estimate of |G|² (None before the first update); may be negative early on."""
        return self._debiased(self._ema_gradient_sq)

    @property
    def trace_sigma(self) -> float | None:
        """Smoothed estimate of tr(Σ), the per-sample gradient covariance trace (None before any update)."""
        return self._debiased(self._ema_trace_sigma)

    @property
    def noise_scale(self) -> float | None:
        """B_simple = tr(Σ)/|G|², or None while either smoothed estimate is not positive."""
        gradient_sq, trace_sigma = self.gradient_sq, self.trace_sigma
        if gradient_sq is None or trace_sigma is None or gradient_sq <= 0 or trace_sigma <= 0:
            return None
        return trace_sigma / gradient_sq

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the EMAs bit-exactly after a resume."""
        return {"beta": self.beta, "steps": self.steps, "ema_gradient_sq": self._ema_gradient_sq,
                "ema_trace_sigma": self._ema_trace_sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the EMA factor must match (bias correction depends on it)."""
        missing = {"beta", "steps", "ema_gradient_sq", "ema_trace_sigma"} - set(state)
        if missing:
            raise ValueError(f"noise scale state lacks {', '.join(sorted(missing))}")
        if float(state["beta"]) != self.beta:
            raise ValueError(
                f"noise scale state has beta {state['beta']} but this estimator has beta {self.beta}"
            )
        self.steps = int(state["steps"])
        self._ema_gradient_sq = float(state["ema_gradient_sq"])
        self._ema_trace_sigma = float(state["ema_trace_sigma"])


class NoiseMeter:
    """Feeds a `NoiseScaleEstimator` from a running loop, full global batches only, with no host synchronisation.

    Two sources. Across ranks (W ≥ 2, an engine that measures norms in its gradient sync): the mean over ranks
    of the local squared norms (b·k samples each) against the synced one (B). Across micro-batches (W = 1,
    k ≥ 2): the gradient after the first micro-step (its items) against the whole iteration's (all items).
    The norms stay on the device (tensors, summed over ranks by `reduce_sum` without being read) and are read
    in order by `flush()` — on logged iterations and before a checkpoint — so the estimator sees exactly the
    same sequence as if each were read at once. The engine is any object with `supports_norm_measurement`,
    `measure_norms(on)`, `measured_norms()` and `grad_norm()`; it is the stateful part a checkpoint saves.
    """

    def __init__(self, estimator: NoiseScaleEstimator, engine: Any, *, world_size: int, local_batch_size: int,
                 global_batch_size: int, grad_accum_steps: int, reduce_sum: Callable[[Any], Any]) -> None:
        self.estimator, self.engine, self.world_size, self.reduce_sum = estimator, engine, world_size, reduce_sum
        self.local_batch_size, self.global_batch_size, self.k = local_batch_size, global_batch_size, grad_accum_steps
        self.by_ranks = self.by_micro_batches = False
        self._first_sq: Any = None
        self._pending: list[tuple[Any, Any, float, float]] = []

    def begin(self, samples: int) -> None:
        """Decide how this iteration is measured (a short last batch is not)."""
        full = samples == self.global_batch_size
        self.by_ranks = full and self.world_size > 1 and bool(self.engine.supports_norm_measurement)
        self.by_micro_batches = full and self.world_size == 1 and self.k > 1
        self._first_sq = None
        self.engine.measure_norms(self.by_ranks)

    def after_micro_step(self, micro_step: int) -> None:
        if self.by_micro_batches and micro_step == 0:
            self._first_sq = self.engine.grad_norm() ** 2

    def after_sync(self, grad_norm: Any, first_items: int, items: int) -> None:
        """Queue this iteration's pair of norms (every rank calls this: the rank sum is a collective)."""
        if self.by_ranks:
            local_sq, global_sq = self.engine.measured_norms()
            self._pending.append((self.reduce_sum(local_sq) / self.world_size, global_sq, self.local_batch_size,
                                  self.global_batch_size))
        elif self.by_micro_batches and self._first_sq is not None and first_items:
            # the loss is divided by the iteration's items, so after micro-step 0 the gradient is
            # (first_items / items) · G_small
            self._pending.append((self._first_sq * (items / first_items) ** 2, grad_norm**2, first_items, items))

    def flush(self) -> None:
        """Read the queued norms (one host synchronisation for all of them) and feed the estimator in order."""
        pending, self._pending = self._pending, []
        for small, big, b_small, b_big in pending:
            small, big = float(small), float(big)
            if math.isfinite(small) and math.isfinite(big):  # a non-finite iteration (on_nonfinite=skip) is left out
                self.estimator.update(small, big, b_small, b_big)

    @property
    def noise_scale(self) -> float | None:
        self.flush()
        return self.estimator.noise_scale

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending.clear()
        self.estimator.load_state_dict(state)
