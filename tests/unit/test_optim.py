"""Optimizer factory: each optimizer's first steps against updates computed by hand from its formula."""

from __future__ import annotations

import sys

import pytest
import torch

from ddp_toolkit.optim import OPTIMIZERS, build_optimizer

LR, WD, MOMENTUM = 0.5, 0.01, 0.9


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2).double()


def _backward(model: torch.nn.Linear, seed: int) -> dict[str, torch.Tensor]:
    """Fill .grad from a fixed squared loss; return copies (LARS overwrites .grad)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(8, 2, dtype=torch.float64, generator=generator)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _weights(model: torch.nn.Linear) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_close(model: torch.nn.Linear, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-14)


# ---- factory ----------------------------------------------------------------------------------------
def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"'rmsprop'.*sgd, adam, adamw, lars, lamb"):
        build_optimizer(_model().parameters(), "rmsprop", lr=0.1)


def test_nesterov_only_for_momentum_optimizers() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(_model().parameters(), "adamw", lr=0.1, nesterov=True)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("inf")])
def test_bad_lr_is_rejected(lr: float) -> None:
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(_model().parameters(), "sgd", lr=lr)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name: str) -> None:
    model = _model()
    optimizer = build_optimizer(model.parameters(), name, lr=0.01, weight_decay=WD)
    before = _weights(model)
    _backward(model, seed=1)
    optimizer.step()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["weight_decay"] == WD  # passed through, never batch-scaled


def test_missing_pytorch_optimizer_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    with pytest.raises(ImportError, match=r"'lars'.*pip install 'ddp_toolkit\[lars\]'"):
        build_optimizer(_model().parameters(), "lars", lr=0.1)


# ---- torch optimizers -------------------------------------------------------------------------------
def test_sgd_momentum_and_coupled_weight_decay() -> None:
    model = _model()
    optimizer = build_optimizer(model.parameters(), "sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD)
    w0, g0 = _weights(model), _backward(model, seed=1)
    optimizer.step()
    buf = {n: g0[n] + WD * w0[n] for n in w0}
    w1 = {n: w0[n] - LR * buf[n] for n in w0}
    _assert_close(model, w1)
    g1 = _backward(model, seed=2)
    optimizer.step()
    buf = {n: MOMENTUM * buf[n] + g1[n] + WD * w1[n] for n in w0}
    _assert_close(model, {n: w1[n] - LR * buf[n] for n in w0})


def test_adamw_first_step_is_sign_like_with_decoupled_decay() -> None:
    model = _model()
    optimizer = build_optimizer(model.parameters(), "adamw", lr=LR, weight_decay=WD, eps=1e-8)
    w0, g0 = _weights(model), _backward(model, seed=1)
    optimizer.step()
    # Bias-corrected moments after one step are g and g², so the Adam direction is g/(|g| + eps).
    _assert_close(model, {n: w0[n] * (1 - LR * WD) - LR * g0[n] / (g0[n].abs() + 1e-8) for n in w0})


def test_adam_weight_decay_is_coupled() -> None:
    model = _model()
    optimizer = build_optimizer(model.parameters(), "adam", lr=LR, weight_decay=WD, eps=1e-8)
    w0, g0 = _weights(model), _backward(model, seed=1)
    optimizer.step()
    g = {n: g0[n] + WD * w0[n] for n in w0}
    _assert_close(model, {n: w0[n] - LR * g[n] / (g[n].abs() + 1e-8) for n in w0})


# ---- LARS and LAMB (pytorch_optimizer) --------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_lars_matches_hand_computed_trust_ratio(foreach: bool) -> None:
    eta = 0.02
    model = _model()
    optimizer = build_optimizer(model.parameters(), "lars", lr=LR, momentum=MOMENTUM, weight_decay=WD,
                                trust_coefficient=eta, foreach=foreach)
    buf = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for seed in (1, 2):
        w, g = _weights(model), _backward(model, seed)
        # Matrix: u = τ·(g + wd·w), τ = η‖w‖/(‖g‖ + wd‖w‖) (You et al. 2017). Bias (1-D): u = g, no decay.
        trust = eta * w["weight"].norm() / (g["weight"].norm() + WD * w["weight"].norm())
        update = {"weight": trust * (g["weight"] + WD * w["weight"]), "bias": g["bias"]}
        buf = {n: MOMENTUM * buf[n] + update[n] for n in w}
        optimizer.step()
        _assert_close(model, {n: w[n] - LR * buf[n] for n in w})
    assert 0 < float(trust) < 1


def test_lars_overwrites_grad_as_documented() -> None:
    model = _model()
    optimizer = build_optimizer(model.parameters(), "lars", lr=LR, weight_decay=WD)
    g = _backward(model, seed=1)
    optimizer.step()
    assert not torch.equal(model.weight.grad, g["weight"])


def _lamb_reference(w: dict, g: dict, m: dict, v: dict, betas: tuple[float, float], eps: float) -> dict:
    """One LAMB step from the formula in ddp_toolkit.optim._lamb: moments without bias correction, λw in r."""
    beta1, beta2 = betas
    new = {}
    for n in w:
        m[n] = beta1 * m[n] + (1 - beta1) * g[n]
        v[n] = beta2 * v[n] + (1 - beta2) * g[n] ** 2
        r = m[n] / (v[n].sqrt() + eps) + WD * w[n]
        trust = w[n].norm().clamp(max=10.0) / (r.norm() + eps)
        new[n] = w[n] - LR * trust * r
    return new


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_matches_hand_computed_trust_ratio(foreach: bool) -> None:
    betas, eps = (0.9, 0.999), 1e-6
    model = _model()
    optimizer = build_optimizer(model.parameters(), "lamb", lr=LR, betas=betas, eps=eps, weight_decay=WD,
                                foreach=foreach)
    m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for seed in (1, 2, 3):
        w, g = _weights(model), _backward(model, seed)
        expected = _lamb_reference(w, g, m, v, betas, eps)
        optimizer.step()
        _assert_close(model, expected)
        # The trust ratio normalises the step: ‖Δw‖ = lr·min(‖w‖, 10), as in the paper (no 1/(1 − β1^t)).
        for n, p in model.named_parameters():
            step = (p.detach() - w[n]).norm()
            assert float(step) == pytest.approx(LR * float(w[n].norm()), rel=1e-5)
