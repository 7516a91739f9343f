"""Batch arithmetic: a table of known cases, hypothesis properties, and every invalid plan's message."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddp_toolkit.plan import BatchPlan, PlanError, split_evenly

# (N, b, W, k, drop_last) -> (B, iterations_per_epoch, dropped, last_batch_size)
KNOWN = [
    ((2000, 500, 1, 1, False), (500, 4, 0, 500)),
    ((60000, 100, 1, 1, False), (100, 600, 0, 100)),
    ((60000, 25, 2, 2, False), (100, 600, 0, 100)),
    ((1000, 500, 1, 1, False), (500, 2, 0, 500)),
    ((1001, 500, 1, 1, False), (500, 3, 0, 1)),
    ((1001, 500, 1, 1, True), (500, 2, 1, 500)),
    ((50000, 32, 4, 4, False), (512, 98, 0, 336)),
    ((50000, 32, 4, 4, True), (512, 97, 336, 512)),
    ((7, 1, 1, 1, False), (1, 7, 0, 1)),
    ((10, 4, 2, 1, False), (8, 2, 0, 2)),
]


@pytest.mark.parametrize(("args", "expected"), KNOWN)
def test_known_plans(args, expected):
    n, b, w, k, drop = args
    plan = BatchPlan(n, b, w, k, drop)
    assert (plan.global_batch_size, plan.iterations_per_epoch, plan.dropped_samples_per_epoch,
            plan.last_batch_size) == expected
    assert plan.local_batch_size == b * k
    assert plan.micro_steps_per_epoch_per_rank == plan.iterations_per_epoch * k


def test_classic_questions():
    # 60000 samples at batch 100: 600 iterations per epoch, 6000 in 10 epochs, 30000 iterations = 50 epochs
    for plan in (BatchPlan(60000, 100, 1, 1), BatchPlan(60000, 25, 2, 2)):
        assert plan.iterations_per_epoch == 600
        assert plan.iterations_for(10) == 6000
        assert plan.epochs_for(30000) == 50.0
    assert BatchPlan(1000, 500, 1, 1).iterations_for(3) == 6
    assert BatchPlan(2000, 500, 1, 1).iterations_for(1) == 4


def test_solve_derives_missing_factor():
    assert BatchPlan.solve(10_000, global_batch_size=512, micro_batch_size=32, world_size=4).grad_accum_steps == 4
    assert BatchPlan.solve(10_000, global_batch_size=512, micro_batch_size=32, grad_accum_steps=4).world_size == 4
    assert BatchPlan.solve(10_000, global_batch_size=512, world_size=4, grad_accum_steps=4).micro_batch_size == 32
    plan = BatchPlan.solve(10_000, micro_batch_size=32, world_size=4, grad_accum_steps=4)
    assert plan.global_batch_size == 512


@pytest.mark.parametrize(("kwargs", "fragments"), [
    (dict(global_batch_size=500, micro_batch_size=24, world_size=4),
     ["global_batch_size 500", "micro_batch_size 24", "world_size 4", "= 96", "480 or 576"]),
    (dict(global_batch_size=100, micro_batch_size=32, grad_accum_steps=1),
     ["global_batch_size 100", "micro_batch_size 32", "grad_accum_steps 1", "world_size"]),
    (dict(global_batch_size=512, micro_batch_size=32, world_size=4, grad_accum_steps=2),
     ["global_batch_size 512", "micro_batch_size 32", "world_size 4", "grad_accum_steps 2", "256"]),
    (dict(global_batch_size=512, micro_batch_size=32), ["missing", "world_size", "grad_accum_steps"]),
    (dict(global_batch_size=0, micro_batch_size=32, world_size=1), ["global_batch_size", "positive", "0"]),
    (dict(global_batch_size=64, micro_batch_size=-8, world_size=1), ["micro_batch_size", "-8"]),
    (dict(global_batch_size=64, micro_batch_size=8, world_size=2.5), ["world_size", "2.5"]),
])
def test_solve_errors_name_every_factor(kwargs, fragments):
    with pytest.raises(PlanError) as err:
        BatchPlan.solve(10_000, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("args", "fragments"), [
    ((0, 8, 1, 1), ["dataset_size", "0"]),
    ((100, 0, 1, 1), ["micro_batch_size", "0"]),
    ((100, 8, -1, 1), ["world_size", "-1"]),
    ((100, 8, 1, 0), ["grad_accum_steps", "0"]),
    ((100, 8, 1, 1.5), ["grad_accum_steps", "1.5"]),
    ((100, 16, 4, 2, True), ["dataset_size 100", "global_batch_size 128", "micro_batch_size 16",
                             "world_size 4", "grad_accum_steps 2", "0 iterations", "at most 100"]),
])
def test_invalid_plans(args, fragments):
    with pytest.raises(PlanError) as err:
        BatchPlan(*args)
    for fragment in fragments:
        assert fragment in str(err.value)


factors = st.integers(1, 64)


@given(n=st.integers(1, 10**6), b=factors, w=st.integers(1, 16), k=st.integers(1, 8), drop=st.booleans())
def test_epoch_accounting(n, b, w, k, drop):
    B = b * w * k
    if drop and n < B:
        with pytest.raises(PlanError):
            BatchPlan(n, b, w, k, drop)
        return
    plan = BatchPlan(n, b, w, k, drop)
    ipe = plan.iterations_per_epoch
    if drop:
        assert ipe * B + plan.dropped_samples_per_epoch == n
        assert ipe == n // B
    else:
        assert ipe == math.ceil(n / B)
        assert (ipe - 1) * B + plan.last_batch_size == n
    assert plan.samples_per_epoch == n - plan.dropped_samples_per_epoch
    split = plan.last_batch_split
    assert len(split) == k and all(len(row) == w for row in split)
    assert sum(map(sum, split)) == plan.last_batch_size
    cells = [c for row in split for c in row]
    assert max(cells) - min(cells) <= 1 and max(cells) <= b


@given(B=st.integers(1, 4096), b=factors, w=st.integers(1, 16), k=st.integers(1, 16))
def test_every_derived_factor_multiplies_back(B, b, w, k):
    for missing in ("micro_batch_size", "world_size", "grad_accum_steps"):
        kwargs = dict(global_batch_size=B, micro_batch_size=b, world_size=w, grad_accum_steps=k)
        kwargs.pop(missing)
        try:
            plan = BatchPlan.solve(10**7, **kwargs)
        except PlanError as err:
            assert str(B) in str(err)
            continue
        assert plan.micro_batch_size * plan.world_size * plan.grad_accum_steps == B


@given(n=st.integers(1, 10**6), b=factors, w=st.integers(1, 8), k=st.integers(1, 4), epochs=st.integers(0, 100))
def test_epochs_iterations_round_trip(n, b, w, k, epochs):
    plan = BatchPlan(n, b, w, k)
    assert plan.epochs_for(plan.iterations_for(epochs)) == epochs
    assert plan.samples_for(plan.iterations_for(epochs)) == epochs * n
    assert plan.iterations_for_samples(epochs * n) == plan.iterations_for(epochs)


@given(count=st.integers(0, 10**4), parts=st.integers(1, 64))
def test_split_evenly(count, parts):
    cells = split_evenly(count, parts)
    assert sum(cells) == count and len(cells) == parts
    assert max(cells) - min(cells) <= 1
    assert cells == sorted(cells, reverse=True)


def test_plan_is_frozen():
    plan = BatchPlan(100, 10, 1, 1)
    with pytest.raises(AttributeError):
        plan.world_size = 2


def test_plan_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ddp_toolkit.plan; from ddp_toolkit import BatchPlan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
