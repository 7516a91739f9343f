"""Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) from data-parallel grads.

Each iteration gives two gradient norms for free: a rank's local gradient over B_small = b·k samples (measured
before the all-reduce, e.g. in a DDP communication hook) and the all-reduced gradient over B_big = B samples.
Since E|G_B|² = |G|² + tr(Σ)/B for a batch of B samples drawn with replacement, two batch sizes give
unbiased estimates of |G|² and tr(Σ); each is smoothed by a bias-corrected EMA before taking the ratio.

Pitfalls:
- Samples drawn without replacement from a finite set of N (one epoch's shards are disjoint) bias the
  |G|² estimate by −tr(Σ)/(N−1) and tr(Σ) by a factor N/(N−1), so the ratio reads HIGH by a factor
  (N/(N−1)) / (1 − B_simple/(N−1)): small while B_simple ≪ N, but it grows without bound as B_simple nears N
  (×2 at B_simple ≈ N/2). `finite_n_corrected` undoes it (train.noise_scale_finite_n).
- A single iteration's estimate is very noisy (|G|² is often negative); only the smoothed ratio is useful,
  and only once |G|² is clearly positive. The ratio of EMAs is itself slightly biased.
- It needs two different batch sizes: W >= 2 ranks, or with W = 1 the k >= 2 micro-batches of an iteration.
- Pass the mean over ranks of the local squared norms as small_sq_norm: same expectation, lower variance.
- Both norms are of mean gradients. With a loss normalised by the global count B, a rank's gradient
  before the all-reduce is (B_small/B)·G_small: multiply it by B/B_small before squaring.
- Read the gradients before `optimizer.step()`: some optimizers (pytorch_optimizer's LARS) modify them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["NoiseMeter", "NoiseScaleEstimator", "finite_n_corrected", "unbiased_estimates"]


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


def finite_n_corrected(noise_scale: float, dataset_size: int) -> float:
    """B_simple from a ratio r measured on batches drawn without replacement from N samples: r·(N−1)/(N + r).

    Without replacement E[tr(Σ) estimate] = tr(Σ)·N/(N−1) and E[|G|² estimate] = |G|² − tr(Σ)/(N−1), so
    r = B·(N/(N−1)) / (1 − B/(N−1)); solved for B. E.g. r = 100 at N = 1000 → 100·999/1100 ≈ 90.82.
    """
    if not isinstance(dataset_size, int) or dataset_size < 2:
        raise ValueError(f"dataset_size must be an int >= 2, got {dataset_size!r}")
    if not math.isfinite(noise_scale) or noise_scale <= 0:
        raise ValueError(f"noise_scale must be a positive finite number, got {noise_scale!r}")
    return noise_scale * (dataset_size - 1) / (dataset_size + noise_scale)


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
    k ≥ 2): the mean over all k micro-steps of |G_m|² against the whole iteration's |G_B|², where micro-step m's
    own gradient is the accumulated gradient after m minus the one after m−1. That costs one extra copy of the
    gradients, held only during measured iterations (an engine whose gradients are not in `p.grad`, DeepSpeed
    ZeRO, falls back to the first micro-batch alone). The norms stay on the device (tensors, summed over ranks by
    `reduce_sum` without being read) and are read in order by `flush()` — on logged iterations and before a
    checkpoint — so the estimator sees exactly the same sequence as if each were read at once. The engine is any
    object with `supports_norm_measurement`, `measure_norms(on)`, `measured_norms()`, `grad_norm()` and `module`;
    it is the stateful part a checkpoint saves. With `dataset_size` N, `noise_scale` is `finite_n_corrected`.
    """

    def __init__(self, estimator: NoiseScaleEstimator, engine: Any, *, world_size: int, local_batch_size: int,
                 global_batch_size: int, grad_accum_steps: int, reduce_sum: Callable[[Any], Any],
                 dataset_size: int | None = None) -> None:
        self.estimator, self.engine, self.world_size, self.reduce_sum = estimator, engine, world_size, reduce_sum
        self.local_batch_size, self.global_batch_size, self.k = local_batch_size, global_batch_size, grad_accum_steps
        self.dataset_size = dataset_size
        self.by_ranks = self.by_micro_batches = self._first_only = False
        self._micro: list[tuple[Any, int]] = []  # (|g_m|² on the device, items of micro-step m)
        self._prev: list[Any] | None = None  # the accumulated gradients after the previous micro-step
        self._pending: list[tuple[Any, Any, float, float]] = []

    def set_plan(self, plan: Any) -> None:
        """A new phase of a batch-size schedule: its local and global batch and k."""
        self.local_batch_size, self.global_batch_size = plan.local_batch_size, plan.global_batch_size
        self.k = plan.grad_accum_steps

    def begin(self, samples: int) -> None:
        """Decide how this iteration is measured (a short last batch is not)."""
        full = samples == self.global_batch_size
        self.by_ranks = full and self.world_size > 1 and bool(self.engine.supports_norm_measurement)
        self.by_micro_batches = full and self.world_size == 1 and self.k > 1
        self._micro, self._prev = [], None
        self.engine.measure_norms(self.by_ranks)

    def after_micro_step(self, micro_step: int, items: int | None = None) -> None:
        """After micro-step m's backward (W = 1): queue |g_m|² of its own gradient on the device; `items` is its
        item count (default b = b·k/k samples)."""
        if not self.by_micro_batches:
            return
        items = self.local_batch_size // self.k if items is None else items
        grads = _local_grads(self.engine)
        if micro_step == 0:
            self._first_only = not grads
        if self._first_only:
            if micro_step == 0:
                self._micro.append((self.engine.grad_norm() ** 2, items))
            return
        if micro_step == 0:
            self._micro.append((_sq_norm(grads), items))
        elif self._prev is None or len(self._prev) != len(grads):  # a gradient appeared late: not measured
            self.by_micro_batches, self._micro, self._prev = False, [], None
            return
        else:
            torch = _torch()
            torch._foreach_sub_(self._prev, grads)  # prev becomes −g_m in place: no second copy
            self._micro.append((_sq_norm(self._prev), items))
        if micro_step == self.k - 1:
            self._prev = None
        elif self._prev is None:
            self._prev = [g.detach().clone() for g in grads]
        else:
            _torch()._foreach_copy_(self._prev, grads)

    def after_sync(self, grad_norm: Any, first_items: int, items: int) -> None:
        """Queue this iteration's pair of norms (every rank calls this: the rank sum is a collective).
        `first_items` is unused: each micro-step's items come with `after_micro_step`."""
        if self.by_ranks:
            local_sq, global_sq = self.engine.measured_norms()
            self._pending.append((self.reduce_sum(local_sq) / self.world_size, global_sq, self.local_batch_size,
                                  self.global_batch_size))
        elif self.by_micro_batches:
            self._queue_micro_batches(grad_norm, items)

    def _queue_micro_batches(self, grad_norm: Any, items: int) -> None:
        # The loss is divided by the iteration's items, so micro-step m's gradient is (n_m/items)·G_m. The mean
        # over m of |G_m|² has expectation |G|² + tr(Σ)·mean(1/n_m): b_small is the harmonic mean of the n_m.
        micro, self._micro, self._prev = [(sq, n) for sq, n in self._micro if n > 0], [], None
        if not micro:
            return
        b_small = len(micro) / sum(1.0 / n for _, n in micro)
        if not b_small < items:
            return
        small = sum(sq * (items / n) ** 2 for sq, n in micro) / len(micro)
        self._pending.append((small, grad_norm**2, b_small, items))

    def flush(self) -> None:
        """Read the queued norms (one host synchronisation for all of them) and feed the estimator in order."""
        pending, self._pending = self._pending, []
        for small, big, b_small, b_big in pending:
            small, big = float(small), float(big)
            if math.isfinite(small) and math.isfinite(big):  # a non-finite iteration (on_nonfinite=skip) is left out
                self.estimator.update(small, big, b_small, b_big)

    @property
    def noise_scale(self) -> float | None:
        """The smoothed B_simple; with `dataset_size`, corrected for sampling without replacement."""
        self.flush()
        value = self.estimator.noise_scale
        return value if value is None or self.dataset_size is None else finite_n_corrected(value, self.dataset_size)

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending.clear()
        self.estimator.load_state_dict(state)


def _torch():
    import torch

    return torch


def _local_grads(engine: Any) -> list[Any]:
    """The gradients in `p.grad` of the engine's bare model (a DTensor's local part: all of it at W = 1)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def _sq_norm(tensors: list[Any]) -> Any:
    """Σ|t|² over the tensors, in float64, as a device tensor (not read)."""
    torch = _torch()
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.double().to(norms[0].device) for n in norms]).square().sum()
