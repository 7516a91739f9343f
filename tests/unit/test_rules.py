"""Large-batch rules beyond the lr (issue #16): β2 and weight-decay scaling, the wsd schedule and the automatic
warmup start factor, each against a hand-computed value, then through the recipe the trainer uses."""

from __future__ import annotations

import math

import pytest
import torch

from ddp_toolkit.config import ConfigError, validate
from ddp_toolkit.lr import Schedule, auto_warmup_start_factor, scaled_beta2, scaled_weight_decay
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.plan_report import plan_info, plan_rows
from ddp_toolkit.recipe import fingerprint, lr_info, make_optimizer, schedule_for


def _cfg(**optim):
    return validate({"optim": {"lr": 1e-3, "base_batch_size": 256, **optim}, "train": {"iterations": 100}})


def _plan(global_batch_size: int = 1024) -> BatchPlan:
    return BatchPlan.solve(8192, global_batch_size=global_batch_size, micro_batch_size=256, world_size=1)


# ---- the rules as pure functions --------------------------------------------------------------------
def test_beta2_keeps_its_half_life_in_samples() -> None:
    assert scaled_beta2(0.999, 4.0) == pytest.approx(0.996005996001, rel=1e-12)  # 0.999⁴ by hand
    assert scaled_beta2(0.99, 0.5) == pytest.approx(0.994987437, rel=1e-9)  # √0.99
    # half-life in samples: B·ln ½/ln β2 is the same at B_ref = 256 and B = 1024
    assert 1024 * math.log(0.5) / math.log(scaled_beta2(0.999, 4.0)) == pytest.approx(256 * math.log(0.5)
                                                                                       / math.log(0.999))
    with pytest.raises(ValueError, match="beta2"):
        scaled_beta2(1.0, 2.0)


def test_weight_decay_keeps_lr_times_decay_proportional_to_batch() -> None:
    # λ = 0.1, η = 1e-3 at 256; sqrt rule at 1024: η' = 2e-3, so λ' = 0.1·4·1e-3/2e-3 = 0.2
    assert scaled_weight_decay(0.1, 1e-3, 2e-3, 4.0) == pytest.approx(0.2, rel=1e-12)
    assert scaled_weight_decay(0.1, 1e-3, 4e-3, 4.0) == pytest.approx(0.1, rel=1e-12)  # linear: λ unchanged
    assert scaled_weight_decay(0.05, 1e-3, 1e-3, 4.0) == pytest.approx(0.2, rel=1e-12)  # no lr rule: κ·λ
    with pytest.raises(ValueError, match="weight_decay"):
        scaled_weight_decay(-0.1, 1e-3, 1e-3, 2.0)


@pytest.mark.parametrize(("rule", "kappa", "expected"), [("none", 4.0, 0.0), ("linear", 4.0, 0.25),
                                                         ("sqrt", 4.0, 0.5), ("adam_sqrt", 16.0, 0.25),
                                                         ("linear", 0.5, 1.0)])
def test_auto_warmup_start_factor_starts_at_the_base_lr(rule: str, kappa: float, expected: float) -> None:
    assert auto_warmup_start_factor(rule, kappa) == expected


def test_wsd_is_flat_then_linear_to_min_lr() -> None:
    # T = 100, W = 10, decay_fraction 0.2: D = 80; lr(90) = 1 − 0.9·10/20 = 0.55
    s = Schedule(peak_lr=1.0, total_iterations=100, warmup_iterations=10, decay="wsd", decay_fraction=0.2,
                 min_lr=0.1)
    assert s.decay_start == 80
    lrs = {i: s.lr_at(i) for i in (0, 5, 10, 79, 80, 90, 99, 100, 150)}
    assert lrs == pytest.approx({0: 0.0, 5: 0.5, 10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 99: 0.145, 100: 0.1,
                                 150: 0.1})


def test_wsd_decay_never_starts_inside_the_warmup() -> None:
    s = Schedule(peak_lr=1.0, total_iterations=10, warmup_iterations=9, decay="wsd", decay_fraction=0.5)
    assert s.decay_start == 9 and s.lr_at(9) == 1.0 and s.lr_at(10) == 0.0
    assert Schedule(peak_lr=1.0, total_iterations=10, decay="wsd", decay_fraction=0.0).lr_at(9) == 1.0
    with pytest.raises(ValueError, match="decay_fraction"):
        Schedule(peak_lr=1.0, total_iterations=10, decay="wsd", decay_fraction=1.5)


# ---- through the recipe -----------------------------------------------------------------------------
def test_make_optimizer_applies_beta2_and_weight_decay_scaling() -> None:
    cfg = _cfg(name="adamw", lr_scaling="sqrt", betas=[0.9, 0.999], weight_decay=0.1, beta2_scaling=True,
               weight_decay_scaling=True)
    group = make_optimizer(cfg, _plan(), [torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert group["lr"] == pytest.approx(2e-3)
    assert group["betas"] == pytest.approx((0.9, 0.996005996001))
    assert group["weight_decay"] == pytest.approx(0.2)
    plain = make_optimizer(_cfg(name="adamw", weight_decay=0.1), _plan(), [torch.nn.Parameter(torch.zeros(2))])
    assert plain.param_groups[0]["betas"] == (0.9, 0.999) and plain.param_groups[0]["weight_decay"] == 0.1


def test_beta2_scaling_with_adam_sqrt_is_refused_before_training() -> None:
    cfg = _cfg(name="adam", lr_scaling="adam_sqrt", beta2_scaling=True)
    with pytest.raises(ConfigError, match="beta2_scaling and lr_scaling=adam_sqrt"):
        schedule_for(cfg, _plan(), 100)


@pytest.mark.parametrize(("optim", "expected"), [({"lr_scaling": "linear"}, 0.25), ({"lr_scaling": "sqrt"}, 0.5),
                                                 ({"lr_scaling": "none"}, 0.0),
                                                 ({"lr_scaling": "linear", "warmup_start_factor": 0.1}, 0.1),
                                                 ({"lr_scaling": "linear", "base_batch_size": None}, 0.0)])
def test_schedule_and_plan_share_the_warmup_start_factor(optim: dict, expected: float) -> None:
    cfg, plan = _cfg(warmup="10it", **optim), _plan()
    schedule = schedule_for(cfg, plan, 100)
    assert schedule.warmup_start_factor == expected == lr_info(cfg, plan)["warmup_start_factor"]
    assert schedule.lr_at(0) == pytest.approx(expected * schedule.peak_lr)
    info = plan_info(cfg, plan)
    assert info["warmup_start_factor"] == expected
    assert f"from {expected:.6g} × the scaled lr" in dict(plan_rows(plan, info))["warmup"]


def test_linear_rule_auto_warmup_starts_at_the_base_lr() -> None:
    schedule = schedule_for(_cfg(lr_scaling="linear", warmup="10it"), _plan(), 100)
    assert schedule.lr_at(0) == pytest.approx(1e-3) and schedule.lr_at(10) == pytest.approx(4e-3)


def test_wsd_and_the_new_keys_reach_the_schedule_and_fingerprint() -> None:
    cfg, plan = _cfg(schedule="wsd", decay_fraction=0.3, beta2_scaling=True), _plan()
    schedule = schedule_for(cfg, plan, 100)
    assert (schedule.decay, schedule.decay_start) == ("wsd", 70)
    fp = fingerprint(cfg, plan, schedule)
    assert fp["optim.decay_fraction"] == 0.3 and fp["optim.beta2_scaling"] is True
    assert fp["optim.weight_decay_scaling"] is False and fp["total_iterations"] == 100
