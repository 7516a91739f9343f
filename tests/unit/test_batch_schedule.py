"""Batch-size schedules: the arithmetic of phases, positions and durations against a step-by-step simulation
written from the definition, and the sampler's coverage of every epoch across phase changes at several W."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddp_toolkit.batch_schedule import BatchSchedule, Position, ramp_phases
from ddp_toolkit.config import ConfigError, load_config
from ddp_toolkit.duration import Duration
from ddp_toolkit.lr import Schedule
from ddp_toolkit.plan import BatchPlan, PlanError
from ddp_toolkit.recipe import batch_schedule_for, schedule_for
from ddp_toolkit.sampler import GlobalBatchSampler


def _reached(d: Duration, it: int, epoch: int, pos: int, seen: int, n: int) -> bool:
    """The definition of 'a duration is reached', spelled out independently of BatchSchedule.reached."""
    if d.unit == "it":
        return it >= d.value
    if d.unit == "sp":
        return seen >= d.value
    return epoch + pos / n >= d.value - 1e-12


def _simulate(n: int, phases: list[tuple[int, Duration | None]], drop_last: bool, iterations: int):
    """Iteration by iteration from the definition: phase = first whose end is not reached; the batch takes the next
    B positions of the epoch (fewer at its end); with drop_last a start that cannot fill B moves to the next epoch.
    Yields (iteration, epoch, epoch position, samples_seen, B, samples of the batch) before every iteration."""
    it = epoch = pos = seen = 0
    while it < iterations:
        size = next(b for b, until in phases if until is None or not _reached(until, it, epoch, pos, seen, n))
        if pos >= n or (drop_last and n - pos < size):
            epoch, pos = epoch + 1, 0
            continue
        take = min(size, n - pos)
        yield it, epoch, pos, seen, size, take
        it, pos, seen = it + 1, pos + take, seen + take


durations = st.one_of(st.integers(1, 60).map(lambda v: Duration(v, "it")),
                      st.integers(1, 900).map(lambda v: Duration(v, "sp")),
                      st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 2.75]).map(lambda v: Duration(v, "ep")))


@st.composite
def schedules(draw):
    n, b, w = draw(st.integers(5, 120)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    drop_last = draw(st.booleans())
    ks = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    if drop_last:
        ks = [k for k in ks if b * w * k <= n] or [1]
        if b * w > n:
            b = w = 1
    unit = draw(st.sampled_from(["sp", "it"]))
    least = b * w * max(ks) if unit == "sp" else 1  # each phase gets at least one iteration (else: one error line)
    gaps = draw(st.lists(st.integers(least, least + 150), min_size=len(ks) - 1, max_size=len(ks) - 1))
    ends = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    sizes = [(b * w * k, Duration(e, unit)) for k, e in zip(ks, ends, strict=False)] + [(b * w * ks[-1], None)]
    base = BatchPlan(n, b, w, ks[0], drop_last=drop_last)
    return BatchSchedule.of_sizes(base, sizes), sizes


@settings(max_examples=150, deadline=None)
@given(schedules(), durations)
def test_walk_matches_a_step_by_step_simulation(drawn, stop):
    schedule, sizes = drawn
    n, drop_last = schedule.dataset_size, schedule.first.drop_last
    steps = list(_simulate(n, sizes, drop_last, 1000))
    # every position before an iteration, and the batch it takes
    pos = Position()
    for it, epoch, epos, seen, size, take in steps[:120]:
        pos = Position(it, epoch, epos, seen) if (pos.epoch, pos.epoch_position) != (epoch, epos) else pos
        assert (pos.iteration, pos.epoch, pos.epoch_position, pos.samples_seen) == (it, epoch, epos, seen)
        assert schedule.plan_at(pos).global_batch_size == size and schedule.batch_size_at(pos) == take
        pos = schedule.after(pos)
    # a duration in iterations: the first iteration boundary at which it is reached
    expected = next(it for it, epoch, epos, seen, _, _ in steps if _reached(stop, it, epoch, epos, seen, n))
    if len(sizes) > 1:
        assert schedule.iterations_in(stop) == expected
    walked = schedule.position_after(expected)
    it, epoch, epos, seen, _, _ = steps[expected]
    assert walked.samples_seen == seen and walked.iteration == expected
    assert schedule.epochs_at(walked) == pytest.approx(epoch + epos / n) or epos == 0


def test_a_fixed_schedule_converts_durations_as_its_plan():
    plan = BatchPlan(1000, 10, 3, 10)  # B = 300: 4 iterations per epoch, a short last batch of 100
    fixed = BatchSchedule.fixed(plan)
    for text in ("7it", "2.5ep", "3ep", "1234sp"):
        assert fixed.iterations_in(text) == plan.iterations_in(text)
    assert fixed.samples_for(6) == plan.samples_for(6) == 1000 + 2 * 300
    assert fixed.epochs_for(6) == pytest.approx(1.6)  # a fraction of the data set, not 6/4 iterations


def test_phase_change_mid_epoch_keeps_every_sample_once_per_epoch_at_every_world_size():
    # N = 100, b = 1: B 8 until 20sp (3 iterations: 24 samples), then B 12 until 1.5ep, then B 24
    n, sizes = 100, [(8, "20sp"), (12, "1.5ep"), (24, None)]
    orders = {}
    for w in (1, 2, 4):
        schedule = BatchSchedule.of_sizes(BatchPlan(n, 1, w, 8 // w), sizes)
        orders[w] = _global_batches(schedule, epochs=3, seed=5)
    assert orders[1] == orders[2] == orders[4]  # the sequence of global batches does not depend on W
    by_epoch: dict[int, list[int]] = {}
    for epoch, batch in orders[1]:
        by_epoch.setdefault(epoch, []).extend(batch)
    assert all(sorted(v) == list(range(n)) for v in by_epoch.values()) and len(by_epoch) == 3
    sizes_seen = [len(b) for _, b in orders[1]]
    assert sizes_seen[:4] == [8, 8, 8, 12]  # the change falls at sample 24, inside the first epoch


@settings(max_examples=60, deadline=None)
@given(schedules(), st.integers(0, 3))
def test_every_sample_once_per_epoch_for_any_phase_layout(drawn, seed):
    schedule, sizes = drawn
    n, drop_last = schedule.dataset_size, schedule.first.drop_last
    batches = _global_batches(schedule, epochs=3, seed=seed)
    first = schedule.first
    one_rank = BatchSchedule.of_sizes(BatchPlan(n, first.micro_batch_size, 1, first.local_batch_size * first.world_size
                                                // first.micro_batch_size, drop_last=drop_last), sizes)
    assert _global_batches(one_rank, epochs=3, seed=seed) == batches  # the same global batches at W = 1
    by_epoch: dict[int, list[int]] = {}
    for epoch, batch in batches:
        by_epoch.setdefault(epoch, []).extend(batch)
    for seen in by_epoch.values():
        assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))  # never twice in an epoch
        if not drop_last:
            assert sorted(seen) == list(range(n))  # and every sample once
        else:  # only a tail smaller than the next batch is dropped
            assert n - len(seen) < max(p.plan.global_batch_size for p in schedule.phases)


def _global_batches(schedule: BatchSchedule, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """Drive one sampler per rank as the trainer does (set_epoch, set_plan, seek at every epoch or phase start) and
    return each iteration's global batch as the union of every rank's micro-batches, in global order."""
    w = schedule.first.world_size
    samplers = [GlobalBatchSampler.from_plan(schedule.first, r, seed=seed) for r in range(w)]
    pos, out = Position(), []
    while pos.epoch < epochs:
        plan, phase = schedule.plan_at(pos), schedule.phase_index(pos)
        iterators = []
        for s in samplers:
            s.set_epoch(pos.epoch)
            s.set_plan(plan)
            s.seek(pos.epoch_position)
            iterators.append(iter(s))
        while True:
            cells = [[next(it) for _ in range(plan.grad_accum_steps)] for it in iterators]
            batch = [i for m in range(plan.grad_accum_steps) for r in range(w) for i in cells[r][m]]
            assert len(batch) == schedule.batch_size_at(pos)
            out.append((pos.epoch, batch))
            nxt = schedule.after(pos)
            if nxt.epoch != pos.epoch or schedule.phase_index(nxt) != phase:
                pos = nxt
                break
            pos = nxt
    return out


def test_drop_last_ends_an_epoch_when_the_next_batch_cannot_be_filled():
    schedule = BatchSchedule.of_sizes(BatchPlan(50, 4, 1, 1, drop_last=True), [(4, "40sp"), (16, None)])
    pos = schedule.position_after(10)  # 10 batches of 4: position 40, the phase of B 16 begins
    assert (pos.epoch, pos.epoch_position) == (1, 0)  # 10 samples left < 16: dropped, the next epoch starts
    assert schedule.position_after(12) == Position(12, 1, 32, 72)
    assert schedule.position_after(13) == Position(13, 2, 0, 88)  # 2 left < 16: the next epoch again


def test_an_empty_phase_and_a_bad_batch_are_one_line_each():
    base = BatchPlan(100, 2, 2, 1)
    with pytest.raises(PlanError, match=r"batch.schedule\[1\] \(until 10sp\) would get no iteration"):
        BatchSchedule.of_sizes(base, [(4, "20sp"), (8, "10sp"), (16, None)]).walk("5ep")
    with pytest.raises(PlanError, match="batch phase 1 .global_batch_size 6.: .*not divisible"):
        BatchSchedule.of_sizes(base, [(4, "20sp"), (6, None)])


def test_ramp_is_megatrons_form():
    # start 32, +32 up to 128 over 3000 samples: 32, 64, 96 for 1000 samples each, then 128
    assert ramp_phases(32, 32, 128, "3000sp") == [(32, Duration(1000, "sp")), (64, Duration(2000, "sp")),
                                                 (96, Duration(3000, "sp"))]
    with pytest.raises(PlanError, match="plus a positive multiple of increment 40"):
        ramp_phases(32, 40, 128, "3000sp")


def test_lr_follows_the_rule_phase_by_phase():
    cfg = load_config(None, ["batch.micro_batch_size=4", "batch.global_batch_size=null", "data.size=1000",
                             "batch.schedule=[{until: 160sp, global_batch_size: 16}, {global_batch_size: 64}]",
                             "optim.lr=0.1", "optim.base_batch_size=16", "optim.lr_scaling=sqrt",
                             "optim.warmup=4it", "optim.warmup_start_factor=null", "optim.schedule=constant",
                             "train.iterations=30"])
    batches = batch_schedule_for(cfg, 1000, 2)
    schedule = schedule_for(cfg, batches.first, 30, batches)
    assert schedule.phase_factors == ((0, 1.0), (10, 2.0))  # sqrt(64 / 16) = 2 from iteration 10 (160 / 16)
    assert schedule.lr_at(0) == pytest.approx(0.1 * 1.0)  # Goyal's warmup starts at the base lr (factor 1 here)
    assert schedule.lr_at(9) == pytest.approx(0.1) and schedule.lr_at(10) == pytest.approx(0.2)
    plain = Schedule(peak_lr=0.1, total_iterations=30, warmup_iterations=4, phase_factors=((0, 1.0), (3, 2.0)))
    assert plain.lr_at(2) == pytest.approx(0.1 * 2 / 4) and plain.lr_at(3) == pytest.approx(0.2 * 3 / 4)


def test_config_refuses_what_a_schedule_cannot_have():
    bad = [
        (["batch.global_batch_size=null", "batch.schedule=[{until: 10sp, global_batch_size: 64}]"],
         "last phase must have no `until`"),
        (["batch.global_batch_size=null", "batch.schedule=[{global_batch_size: 64}, {global_batch_size: 128}]"],
         "needs `until`"),
        (["batch.global_batch_size=null", "batch.grad_accum_steps=2",
          "batch.schedule=[{global_batch_size: 64}]"], "k follows each phase"),
        (["batch.schedule=[{global_batch_size: 64}]"], "each phase gives its own"),
        (["batch.ramp={start: 16, increment: 16, over: 100sp}", "batch.global_batch_size=null"], "ramp needs"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["batch.micro_batch_size=16", *overrides])
    with pytest.raises(ConfigError, match="data.order: global"):
        cfg = load_config(None, ["batch.micro_batch_size=16", "batch.global_batch_size=null",
                                 "data.order=distributed_sampler",
                                 "batch.schedule=[{until: 10sp, global_batch_size: 32}, {global_batch_size: 64}]"])
        batch_schedule_for(cfg, 1000, 2)


def test_fractional_epoch_ends_are_exact():
    schedule = BatchSchedule.of_sizes(BatchPlan(90, 3, 1, 1), [(3, "0.5ep"), (9, None)])
    assert schedule.iterations_in("0.5ep") == 15  # 45 samples of 90
    assert schedule.iterations_in("1ep") == 15 + 5
    assert math.isclose(schedule.epochs_for(17), 0.5 + 18 / 90)


def test_plan_prints_every_phase(capsys):
    from ddp_toolkit.cli import main

    overrides = ["batch.micro_batch_size=16", "batch.global_batch_size=null", "data.size=4096",
                 "batch.schedule=[{until: 500sp, global_batch_size: 32}, {until: 1.5ep, global_batch_size: 64}, "
                 "{global_batch_size: 128}]", "train.epochs=3", "optim.lr_scaling=linear", "optim.base_batch_size=32",
                 "optim.lr=0.1"]
    assert main(["plan", "--world-size", "2", *overrides, "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    # 500sp: 16 batches of 32 (512 ≥ 500); 1.5ep = 6144: (6144 − 512) / 64 = 88; then 6144 / 128 = 48
    assert [(p["global_batch_size"], p["grad_accum_steps"], p["first_iteration"], p["iterations"])
            for p in info["batch_schedule"]] == [(32, 1, 0, 16), (64, 2, 16, 88), (128, 4, 104, 48)]
    assert [p["scaled_lr"] for p in info["batch_schedule"]] == pytest.approx([0.1, 0.2, 0.4])
    assert info["total_iterations"] == 152 and info["total_samples"] == 3 * 4096
    assert main(["plan", "--world-size", "2", *overrides]) == 0
    table = capsys.readouterr().out
    assert "batch phase 2" in table and "B 128 (k 4) from iteration 104" in table


def test_a_sweep_rule_can_be_a_batch_ramp(tmp_path):
    from ddp_toolkit.recipe import batch_schedule_for
    from ddp_toolkit.sweep.points import expand_points
    from ddp_toolkit.sweep.spec import sweep_from_dict

    raw = {"base": {"data": {"name": "synthetic", "size": 2048, "eval_size": 64}, "batch": {"micro_batch_size": 64}},
           "batch_sizes": [32, 128, 256], "samples": 4096, "tolerance": 0.01,
           "rules": [{"name": "linear", "lr_scaling": "linear"},
                     {"name": "ramp", "lr_scaling": "linear", "batch_ramp": {"start": 32, "over": "2048sp"}}]}
    points = [p for p in expand_points(sweep_from_dict(raw), tmp_path, 1, base_lr=0.1) if p.rule == "ramp"]
    by_b = {p.global_batch_size: p.config for p in points}
    assert by_b[32].batch.ramp is None  # nothing to ramp at the start size: the fixed run
    cfg = by_b[256]
    assert cfg.batch.ramp.start == 32 and cfg.batch.ramp.increment == 32 and cfg.train.samples == 4096
    batches = batch_schedule_for(cfg, 2048, 1)
    assert [p.plan.global_batch_size for p in batches.phases] == [32, 64, 96, 128, 160, 192, 224, 256]
    seen = batches.samples_for(batches.iterations_in("4096sp"))  # the budget of fixed B, to within one batch
    assert 4096 <= seen < 4096 + 256
    with pytest.raises(ConfigError, match="global batch 48 is not a multiple of start 32"):
        sweep_from_dict({**raw, "batch_sizes": [32, 48]})


def test_cli_refuses_a_schedule_deepspeed_cannot_run(tmp_path, capsys):
    from ddp_toolkit.cli import main

    code = main(["plan", "--world-size", "2", "batch.micro_batch_size=16", "batch.global_batch_size=null",
                 "batch.schedule=[{until: 100sp, global_batch_size: 32}, {global_batch_size: 64}]",
                 "train.engine=deepspeed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "deepspeed" in err[0] and "Traceback" not in err[0]
