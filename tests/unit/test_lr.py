"""Scaling rules, Malladi et al.'s Adam rule, schedules, LambdaLR wiring and duration parsing."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ddp_toolkit import lr as lr_module
from ddp_toolkit.lr import (
    Schedule,
    adam_sqrt_hparams,
    build_scheduler,
    scaled_lr,
)
from ddp_toolkit.plan import BatchPlan, parse_duration


# ---- scaling rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "expected"),
    [("none", 0.1), ("linear", 3.2), ("sqrt", 0.1 * math.sqrt(32)), ("adam_sqrt", 0.1 * math.sqrt(32))],
)
def test_scaled_lr_rules(rule: str, expected: float) -> None:
    assert scaled_lr(0.1, 8192, 256, rule) == pytest.approx(expected, rel=1e-12)


def test_scaled_lr_is_identity_at_reference_batch() -> None:
    for rule in ("none", "linear", "sqrt", "adam_sqrt"):
        assert scaled_lr(0.3, 512, 512, rule) == pytest.approx(0.3)


def test_scaled_lr_rejects_unknown_rule_naming_choices() -> None:
    with pytest.raises(ValueError, match=r"'cubic'.*none, linear, sqrt, adam_sqrt"):
        scaled_lr(0.1, 512, 256, "cubic")


@pytest.mark.parametrize(
    ("args", "name"),
    [((0.0, 512, 256), "base_lr"), ((0.1, 0, 256), "global_batch_size"), ((0.1, 512, -4), "base_batch_size")],
)
def test_scaled_lr_rejects_non_positive(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        scaled_lr(*args, "linear")


def test_adam_sqrt_hparams_follow_malladi() -> None:
    (beta1, beta2), eps = adam_sqrt_hparams((0.9, 0.999), 1e-8, 4.0)
    assert beta1 == pytest.approx(1 - 4 * 0.1)
    assert beta2 == pytest.approx(1 - 4 * 0.001)
    assert eps == pytest.approx(1e-8 / 2)


def test_adam_sqrt_hparams_round_trip() -> None:
    betas, eps = adam_sqrt_hparams((0.9, 0.98), 1e-6, 2.0)
    back, eps_back = adam_sqrt_hparams(betas, eps, 0.5)
    assert back == pytest.approx((0.9, 0.98), abs=1e-15)
    assert eps_back == pytest.approx(1e-6)


def test_adam_sqrt_hparams_rejects_kappa_that_kills_beta() -> None:
    with pytest.raises(ValueError, match=r"betas\[0\] = 0.9 with kappa = 12.*kappa < 1/\(1 - beta\) = 10"):
        adam_sqrt_hparams((0.9, 0.999), 1e-8, 12.0)


# ---- schedule ---------------------------------------------------------------------------------------
def test_warmup_is_linear_from_start_factor_to_exact_peak() -> None:
    s = Schedule(peak_lr=1.6, total_iterations=100, warmup_iterations=10, warmup_start_factor=0.25)
    assert s.lr_at(0) == pytest.approx(0.4)
    assert s.lr_at(5) == pytest.approx(1.6 * (0.25 + 0.75 * 0.5))
    assert s.lr_at(10) == 1.6
    assert s.lr_at(99) == 1.6
    diffs = [s.lr_at(i + 1) - s.lr_at(i) for i in range(10)]
    assert diffs == pytest.approx([1.6 * 0.75 / 10] * 10)


def test_cosine_reaches_min_lr_at_total_iterations() -> None:
    s = Schedule(peak_lr=1.0, total_iterations=110, warmup_iterations=10, decay="cosine", min_lr=0.1)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)
    assert s.lr_at(109) > 0.1


def test_step_decay_at_milestones() -> None:
    s = Schedule(peak_lr=0.8, total_iterations=90, warmup_iterations=5, decay="step",
                 step_milestones=(30, 60, 80), step_gamma=0.1)
    lrs = [s.lr_at(i) for i in (29, 30, 59, 60, 80, 89)]
    assert lrs == pytest.approx([0.8, 0.08, 0.08, 0.008, 8e-4, 8e-4])


def test_step_decay_is_floored_at_min_lr() -> None:
    s = Schedule(peak_lr=1.0, total_iterations=10, decay="step", step_milestones=(2, 4), min_lr=0.05)
    assert s.lr_at(5) == 0.05


def test_no_warmup_starts_at_peak() -> None:
    assert Schedule(peak_lr=0.5, total_iterations=3).lr_at(0) == 0.5


def test_warmup_longer_than_run_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"warmup_iterations 120.*total_iterations 100"):
        Schedule(peak_lr=0.1, total_iterations=100, warmup_iterations=120)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": "linear"}, r"'linear'.*constant, cosine, step, wsd"),
        ({"decay": "wsd", "decay_fraction": -0.1}, "decay_fraction"),
        ({"decay": "step", "step_milestones": (50, 20)}, "strictly increasing"),
        ({"decay": "step", "step_milestones": (5,), "warmup_iterations": 5}, r"milestone 5 .*\(warmup_iter"),
        ({"decay": "step", "step_milestones": (101,)}, r"milestone 101.*total_iterations 100"),
        ({"step_milestones": (50,)}, "decay is 'constant'"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"warmup_start_factor": 1.5}, "warmup_start_factor"),
        ({"peak_lr": 0.0}, "peak_lr"),
        ({"total_iterations": 0}, "total_iterations"),
    ],
)
def test_schedule_validation(kwargs: dict, match: str) -> None:
    args = {"peak_lr": 0.1, "total_iterations": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        Schedule(**args)


def test_negative_iteration_is_rejected() -> None:
    with pytest.raises(ValueError, match="iteration"):
        Schedule(peak_lr=0.1, total_iterations=10).lr_at(-1)


@given(
    total=st.integers(1, 5000),
    warmup_fraction=st.floats(0, 1),
    start=st.floats(0, 1),
    decay=st.sampled_from(["constant", "cosine", "step", "wsd"]),
    min_fraction=st.floats(0, 1),
)
def test_schedule_properties(total: int, warmup_fraction: float, start: float, decay: str,
                             min_fraction: float) -> None:
    warmup = int(warmup_fraction * total)
    milestones = (warmup + 1,) if decay == "step" and warmup < total else ()
    s = Schedule(peak_lr=2.0, total_iterations=total, warmup_iterations=warmup, warmup_start_factor=start,
                 decay=decay, step_milestones=milestones, min_lr=2.0 * min_fraction, decay_fraction=min_fraction)
    lrs = [s.lr_at(i) for i in range(total + 1)]
    assert all(min(s.min_lr, 2.0 * start) - 1e-12 <= lr <= 2.0 + 1e-12 for lr in lrs)
    steps = [b - a for a, b in zip(lrs[:-1], lrs[1:], strict=True)]
    assert all(d >= -1e-12 for d in steps[:warmup])  # warmup never decreases
    assert all(d <= 1e-12 for d in steps[warmup:])  # decay never increases
    assert lrs[warmup] == pytest.approx(2.0)
    assert all(s.factor_at(i) == pytest.approx(lr / 2.0) for i, lr in enumerate(lrs))


def test_90_epoch_schedule_has_the_same_shape_at_every_batch_size() -> None:
    dataset_size = 1_281_167  # ImageNet-1k train
    shapes = {}
    for batch in (256, 8192):
        plan = BatchPlan(dataset_size, batch, 1, 1, drop_last=True)
        total = plan.iterations_in("90ep")
        warmup = plan.iterations_in("5ep")
        milestones = tuple(plan.iterations_in(f"{e}ep") for e in (30, 60, 80))
        s = Schedule(peak_lr=0.1 * batch / 256, total_iterations=total, warmup_iterations=warmup,
                     warmup_start_factor=256 / batch, decay="step", step_milestones=milestones)
        shapes[batch] = (warmup / total, [m / total for m in milestones], s)
    assert shapes[256][0] == pytest.approx(5 / 90, rel=1e-12)
    assert shapes[8192][0] == pytest.approx(shapes[256][0], rel=1e-12)
    assert shapes[8192][1] == pytest.approx(shapes[256][1], rel=1e-12)
    for fraction in (0.06, 0.2, 0.4, 0.7, 0.95):
        factors = [s.factor_at(round(fraction * s.total_iterations)) for _, _, s in shapes.values()]
        assert factors[0] == pytest.approx(factors[1])


def test_build_scheduler_follows_schedule_and_survives_state_dict() -> None:
    schedule = Schedule(peak_lr=0.4, total_iterations=20, warmup_iterations=4, decay="cosine", min_lr=0.04)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=schedule.peak_lr)
    scheduler = build_scheduler(optimizer, schedule)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr_at(i) for i in range(10)], rel=1e-12)

    # Resume order: build optimizer and scheduler, then load the optimizer state (it restores the lr),
    # then the scheduler state (it restores the iteration but leaves the lr alone).
    resumed_optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=schedule.peak_lr)
    resumed = build_scheduler(resumed_optimizer, schedule)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(10), rel=1e-12)
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(11), rel=1e-12)


def test_lr_module_has_no_module_level_torch_import() -> None:
    tree = ast.parse(Path(lr_module.__file__).read_text())
    imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name and name.split(".")[0] == "torch"]


# ---- durations --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("5ep", (5.0, "ep")), ("2.5ep", (2.5, "ep")), ("500it", (500.0, "it")), ("500", (500.0, "it")),
     (" 20000sp ", (20000.0, "sp")), (500, (500.0, "it")), (0, (0.0, "it")), ("0ep", (0.0, "ep"))],
)
def test_parse_duration(text: str | int, expected: tuple[float, str]) -> None:
    d = parse_duration(text)
    assert (d.value, d.unit) == expected
    assert parse_duration(str(d)) == d  # the canonical text reads back to the same value


@pytest.mark.parametrize(
    "text", ["5 epochs", "ep", "-5ep", "1.5it", "10.5sp", "5e3sp", "", "3h", -1, 2.5, True]
)
def test_parse_duration_rejects_bad_text_naming_forms(text: object) -> None:
    with pytest.raises(ValueError, match=rf"{re.escape(repr(text))}.*500it.*5ep.*20000sp"):
        parse_duration(text)  # type: ignore[arg-type]


def test_durations_convert_through_the_plan() -> None:
    plan = BatchPlan(25_600, 256, 1, 1)  # 100 iterations per epoch
    assert plan.iterations_in("5ep") == 500
    assert BatchPlan(5 * 256, 256, 1, 1).iterations_in("0.5ep") == 3  # 2.5 rounds up to a whole iteration
    assert plan.iterations_in("1000sp") == 4  # ceil(1000 / 256)
    assert plan.iterations_in("1024sp") == 4
    assert plan.iterations_in(500) == 500 and plan.iterations_in("500it") == 500
    assert BatchPlan(819_200, 8192, 1, 1).iterations_in("20000sp") == 3
    assert BatchPlan(1000, 300, 1, 1).iterations_in("2000sp") == 8  # short last batches of 100 count exactly
