"""Optimizer factory: sgd, adam, adamw from torch; lars and lamb from the `pytorch_optimizer` package.

Weight decay is passed through unchanged: it is not scaled with the batch size (Goyal et al. 2017);
only the learning rate is (see `ddp_toolkit.lr.scaled_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ddp_toolkit.names import OPTIMIZERS, OptimizerName

__all__ = ["OPTIMIZERS", "OptimizerName", "build_optimizer"]



Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _pytorch_optimizer(name: str) -> Any:
    """Import pytorch_optimizer lazily: only lars and lamb need it."""
    try:
        import pytorch_optimizer
    except ImportError as err:
        raise ImportError(
            f"optimizer {name!r} needs the pytorch_optimizer package: pip install 'ddp_toolkit[lars]'"
        ) from err
    return pytorch_optimizer


def _lars(params: Params, lr: float, momentum: float, weight_decay: float, nesterov: bool,
          **extra: Any) -> torch.optim.Optimizer:
    """LARS (You et al. 2017) as pytorch_optimizer implements it.

    For every tensor with ndim > 1: u = τ·(g + wd·w) with trust ratio τ = η·‖w‖/(‖g‖ + wd·‖w‖) (1 if ‖w‖ or
    the denominator is 0), η = trust_coefficient (default 1e-3, pass it in `extra`); tensors with ndim <= 1
    (biases, norm scales) get u = g: no trust ratio and NO weight decay. Then buf = momentum·buf +
    (1 − dampening)·u, w ← w − lr·buf (or lr·(u + momentum·buf) with nesterov). Since τ carries η, lr is
    much larger than plain SGD's. It overwrites p.grad with u in place: read gradients before step().
    """
    lib = _pytorch_optimizer("lars")
    return lib.LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **extra)


def _lamb(params: Params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
          **extra: Any) -> torch.optim.Optimizer:
    """LAMB (You et al. 2020, Algorithm 2) from pytorch_optimizer, set up to follow the paper.

    m, v are Adam moments WITHOUT bias correction (the library's choice), r = m/(sqrt(v) + ε) + λ·w,
    τ = min(‖w‖, 10)/(‖r‖ + ε) (1 if ‖w‖ or ‖r‖ is 0), w ← w − lr·τ·r, for every tensor (biases too).
    We pass weight_decouple=False (λ·w inside the trust ratio, as in the paper; the library default is
    AdamW-style decay outside it) and adam_debias=True (step size lr, so ‖Δw‖ = lr·min(‖w‖, 10) as in the
    paper; the library default divides lr by 1 − β1^t, a 10× larger first step). Override both in `extra`.
    """
    lib = _pytorch_optimizer("lamb")
    options: dict[str, Any] = {"weight_decouple": False, "adam_debias": True, **extra}
    return lib.Lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def build_optimizer(
    params: Params,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    nesterov: bool = False,
    **extra: Any,
) -> torch.optim.Optimizer:
    """Build optimizer `name` (sgd | adamw | adam | lars | lamb); `extra` goes to its constructor.

    momentum and nesterov apply to sgd and lars, betas and eps to adam, adamw and lamb. sgd and adam add
    weight_decay·w to the gradient (L2); adamw decays w by lr·weight_decay per step (decoupled).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if nesterov and name not in ("sgd", "lars"):
        raise ValueError(f"nesterov applies only to sgd and lars, not to {name!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov, **extra)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)
    if name == "lars":
        return _lars(params, lr, momentum, weight_decay, nesterov, **extra)
    return _lamb(params, lr, tuple(betas), eps, weight_decay, **extra)
