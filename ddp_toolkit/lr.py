"""Learning-rate scaling rules and schedules as pure functions of the iteration.

Vocabulary: B is the global batch size (samples per optimizer step over all ranks and micro-steps),
B_ref the batch size at which the base learning rate was tuned, and an iteration is one optimizer step.
No torch import at module level; only `build_scheduler` imports it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "SCALING_RULES",
    "ScalingRule",
    "Decay",
    "DECAYS",
    "scaled_lr",
    "adam_sqrt_hparams",
    "scaled_beta2",
    "scaled_weight_decay",
    "auto_warmup_start_factor",
    "Schedule",
    "build_scheduler",
]

from ddp_toolkit.names import DECAYS, SCALING_RULES, Decay, ScalingRule  # noqa: E402 - declared once there


def _check_positive(name: str, value: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ---- large-batch scaling rules ----------------------------------------------------------------------
def scaled_lr(base_lr: float, global_batch_size: int, base_batch_size: int, rule: ScalingRule) -> float:
    """Learning rate for global batch B from `base_lr` tuned at B_ref, under a large-batch scaling rule.

    linear: base·B/B_ref (Goyal et al. 2017, SGD); sqrt: base·sqrt(B/B_ref); adam_sqrt: base·sqrt(κ) with
    κ = B/B_ref, the lr part of Malladi et al. 2022 (pair it with `adam_sqrt_hparams` for betas and eps).
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown lr scaling rule {rule!r}; choose one of {', '.join(SCALING_RULES)}")
    _check_positive("base_lr", base_lr)
    _check_positive("global_batch_size", global_batch_size)
    _check_positive("base_batch_size", base_batch_size)
    kappa = global_batch_size / base_batch_size
    if rule == "none":
        return float(base_lr)
    if rule == "linear":
        return base_lr * kappa
    return base_lr * math.sqrt(kappa)


def adam_sqrt_hparams(
    betas: tuple[float, float], eps: float, kappa: float
) -> tuple[tuple[float, float], float]:
    """Adam betas and eps for a batch κ times larger, by Malladi et al. 2022's SDE square-root rule.

    1−β is multiplied by κ for both betas (β' = 1 − κ(1−β)) and ε' = ε/sqrt(κ); the lr goes with sqrt(κ).
    """
    _check_positive("kappa", kappa)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    scaled = []
    for index, beta in enumerate(betas):
        if not 0 <= beta < 1:
            raise ValueError(f"betas[{index}] must be in [0, 1), got {beta!r}")
        new_beta = 1.0 - kappa * (1.0 - beta)
        if new_beta <= 0:
            raise ValueError(
                f"adam_sqrt rule: betas[{index}] = {beta} with kappa = {kappa} gives 1 - kappa·(1 - beta) = "
                f"{new_beta:.6g} <= 0; the rule only holds for kappa < 1/(1 - beta) = {1 / (1 - beta):.6g}"
            )
        scaled.append(new_beta)
    return (scaled[0], scaled[1]), eps / math.sqrt(kappa)


def scaled_beta2(beta2: float, kappa: float) -> float:
    """β2' = β2^κ: Adam's second-moment half-life stays fixed in samples when the batch grows κ-fold.

    The EMA forgets a fraction 1−β2 per step, so over κ times fewer steps for the same samples the decay per
    step must be β2^κ (Busbridge et al. 2023; Marek et al. 2025). E.g. 0.999 at κ = 4 → 0.999⁴ ≈ 0.996006.
    """
    _check_positive("kappa", kappa)
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
    return beta2**kappa


def scaled_weight_decay(weight_decay: float, base_lr: float, lr: float, kappa: float) -> float:
    """λ' with η'·λ' = η·λ·κ: AdamW's decay timescale 1/(ηλ) iterations stays fixed in samples.

    Decoupled weight decay shrinks the weights by η·λ per step; κ times fewer steps for the same samples need
    κ times more shrink per step (Wang & Aitchison 2024; Bergsma et al. 2025): λ' = λ·κ·η/η'.
    """
    for name, value in (("base_lr", base_lr), ("lr", lr), ("kappa", kappa)):
        _check_positive(name, value)
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    return weight_decay * kappa * base_lr / lr


def auto_warmup_start_factor(rule: ScalingRule, kappa: float) -> float:
    """Warmup start factor that makes the first step use the unscaled base lr (Goyal et al. 2017).

    linear: 1/κ = B_ref/B; sqrt and adam_sqrt: 1/sqrt(κ); none: 0 (warm up from zero). Capped at 1: a batch
    smaller than B_ref has a scaled lr below the base lr, so there is nothing to warm up from.
    """
    _check_positive("kappa", kappa)
    if rule == "none":
        return 0.0
    return min(1.0, 1.0 / kappa if rule == "linear" else 1.0 / math.sqrt(kappa))


# ---- schedule ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Learning rate as a pure function of the iteration: linear warmup, then constant, cosine, step or wsd.

    `lr_at(i)` is the lr used by the optimizer step taken when i steps are already done (i = 0 for the
    first step), so iteration i's step produces iteration i+1's weights.

    - Warmup (Goyal et al. 2017, gradual): for i < W = warmup_iterations, lr = peak·(s + (1−s)·i/W) with
      s = warmup_start_factor, so the first step uses s·peak and i = W is exactly peak.
    - constant: peak for every i >= W.
    - cosine: lr = min_lr + (peak − min_lr)·(1 + cos(π·p))/2 with p = (i − W)/(T − W), T = total_iterations;
      reaches min_lr at i = T (the last step, i = T−1, is just above it) and stays there for i > T
      (when W = T there is no decay phase and the lr stays at peak).
    - step: lr = max(min_lr, peak·step_gamma**n), n = number of milestones m <= i (milestones in
      iterations, each in (W, T]).
    - wsd (warmup–stable–decay, Hägele et al. 2024): peak until D = T − round(decay_fraction·T) (never
      before W), then linear to min_lr: lr = peak − (peak − min_lr)·(i − D)/(T − D), min_lr at i = T.
    """

    peak_lr: float
    """Lr reached at the end of warmup (already batch-scaled)."""
    total_iterations: int
    """T: optimizer steps in the whole run."""
    warmup_iterations: int = 0
    """W: steps of linear warmup; 0 for none."""
    warmup_start_factor: float | None = 0.0
    """Fraction of peak used by the first step (None: 0); Goyal et al. use B_ref/B (`auto_warmup_start_factor`)."""
    decay: Decay = "constant"
    """Shape after warmup: constant, cosine, step or wsd."""
    step_milestones: tuple[int, ...] = ()
    """Iterations at which `step` decay multiplies the lr by step_gamma (strictly increasing)."""
    step_gamma: float = 0.1
    """Factor applied at each milestone."""
    min_lr: float = 0.0
    """End of the cosine and wsd decays and floor of step decay; warmup may start below it."""
    decay_fraction: float = 0.2
    """wsd: the last fraction of the run (of T) that decays linearly to min_lr; ignored by the other decays."""
    phase_factors: tuple[tuple[int, float], ...] = ()
    """Batch-size schedule: (first iteration of a phase, its lr / the first phase's lr), increasing; the lr of
    iteration i is the shape above times the factor of i's phase (1 before the first entry)."""

    def __post_init__(self) -> None:
        _check_positive("peak_lr", self.peak_lr)
        for name in ("total_iterations", "warmup_iterations"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.total_iterations < 1:
            raise ValueError(f"total_iterations must be >= 1, got {self.total_iterations}")
        if not 0 <= self.warmup_iterations <= self.total_iterations:
            raise ValueError(
                f"warmup_iterations {self.warmup_iterations} must be in [0, total_iterations "
                f"{self.total_iterations}]: the warmup cannot be longer than the run"
            )
        if self.warmup_start_factor is None:  # not given: warm up from zero
            object.__setattr__(self, "warmup_start_factor", 0.0)
        if not 0.0 <= self.warmup_start_factor <= 1.0:
            raise ValueError(f"warmup_start_factor must be in [0, 1], got {self.warmup_start_factor!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}; choose one of {', '.join(DECAYS)}")
        if not 0.0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"min_lr {self.min_lr!r} must be in [0, peak_lr {self.peak_lr}]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        object.__setattr__(self, "step_milestones", tuple(self.step_milestones))
        self._check_milestones()
        object.__setattr__(self, "phase_factors", tuple((int(i), float(f)) for i, f in self.phase_factors))
        starts = [i for i, _ in self.phase_factors]
        if starts != sorted(set(starts)) or any(not (math.isfinite(f) and f > 0) for _, f in self.phase_factors):
            raise ValueError(f"phase_factors must have increasing iterations and positive factors, "
                             f"got {list(self.phase_factors)}")

    def _check_milestones(self) -> None:
        milestones = self.step_milestones
        if milestones and self.decay != "step":
            raise ValueError(
                f"step_milestones {list(milestones)} given but decay is {self.decay!r}, not 'step'"
            )
        if not 0.0 < self.step_gamma <= 1.0:
            raise ValueError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        w, t = self.warmup_iterations, self.total_iterations
        for m in milestones:
            if not _is_int(m) or not w < m <= t:
                raise ValueError(
                    f"step milestone {m!r} must be an int iteration in (warmup_iterations {w}, "
                    f"total_iterations {t}]"
                )
        if any(b <= a for a, b in zip(milestones[:-1], milestones[1:], strict=True)):
            raise ValueError(f"step_milestones must be strictly increasing, got {list(milestones)}")

    def lr_at(self, iteration: int) -> float:
        """Lr of the step taken after `iteration` steps (0-based); see the class docstring for the shape."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return self._shape_at(iteration) * self.phase_factor(iteration)

    def phase_factor(self, iteration: int) -> float:
        """The batch-size phase's lr factor at `iteration` (1 without a batch-size schedule)."""
        factor = 1.0
        for first, f in self.phase_factors:
            if first > iteration:
                break
            factor = f
        return factor

    def _shape_at(self, iteration: int) -> float:
        w, t, peak = self.warmup_iterations, self.total_iterations, self.peak_lr
        if iteration < w:
            s = self.warmup_start_factor
            return peak * (s + (1.0 - s) * iteration / w)
        if self.decay == "constant":
            return peak
        if self.decay == "cosine":
            progress = 0.0 if t == w else min(1.0, (iteration - w) / (t - w))  # t == w: no decay phase
            return self.min_lr + (peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "wsd":
            start = self.decay_start
            progress = 0.0 if t == start else min(1.0, (iteration - start) / (t - start))
            return peak - (peak - self.min_lr) * max(0.0, progress)
        passed = sum(1 for m in self.step_milestones if m <= iteration)
        return max(self.min_lr, peak * self.step_gamma**passed)

    @property
    def decay_start(self) -> int:
        """wsd: D, the first iteration of the linear decay (T − round(decay_fraction·T), at least W)."""
        w, t = self.warmup_iterations, self.total_iterations
        return max(w, t - round(self.decay_fraction * t))

    def factor_at(self, iteration: int) -> float:
        """lr_at(iteration) / peak_lr: the multiplier `torch.optim.lr_scheduler.LambdaLR` expects."""
        return self.lr_at(iteration) / self.peak_lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `schedule`; step it once per iteration (optimizer step), never per micro-step.

    LambdaLR multiplies each param group's initial lr by `schedule.factor_at`, so build the optimizer with
    lr = schedule.peak_lr (groups with another lr keep their ratio to it). Construction sets factor_at(0).
    To resume, build both, then load the optimizer's state (it holds the lr), then the scheduler's.
    """
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_lambda=schedule.factor_at)
