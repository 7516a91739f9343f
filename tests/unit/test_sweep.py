"""Sweep files, point expansion, the sample budget, the verdict, steps-to-target and resumability."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

from ddp_toolkit.cli import main
from ddp_toolkit.config import ConfigError
from ddp_toolkit.sweep import (
    CurvePoint,
    PointResult,
    default_target,
    expand_points,
    is_finished,
    iterations_for_budget,
    load_sweep,
    micro_batch_for,
    run_sweep,
    steps_to_target,
    sweep_from_dict,
    verdicts,
)

BASE = {
    "run_dir": "unused",
    "data": {"name": "synthetic", "size": 512, "eval_size": 64, "features": 4, "classes": 3},
    "model": {"name": "linear"},
    "batch": {"micro_batch_size": 8},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
    "train": {"seed": 1},
}


def _sweep(**changes) -> dict:
    raw = {"base": json.loads(json.dumps(BASE)), "batch_sizes": [16, 64], "samples": 256, "tolerance": 0.02,
           "rules": [{"name": "none"}, {"name": "linear+warmup", "lr_scaling": "linear", "warmup": "64sp"}]}
    raw.update(changes)
    return raw


# ---- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": 1}, "unknown key 'colour'"),
        ({"batch_sizes": []}, "batch_sizes"),
        ({"batch_sizes": [16, 16]}, "batch_sizes: .*distinct"),
        ({"batch_sizes": [0, 16]}, "batch_sizes.*positive"),
        ({"samples": 0}, "samples.*greater than 0 .got 0"),
        ({"tolerance": -1}, "tolerance"),
        ({"rules": []}, "rules"),
        ({"rules": [{"name": "a"}, {"name": "a"}]}, "rule name 'a' appears twice"),
        ({"rules": [{"name": "a", "lr_scaling": "cubic"}]}, "rules.0.lr_scaling.*'cubic'"),
        ({"rules": [{"name": "a", "warmup": "5 weeks"}]}, "rules.0.warmup.*5 weeks"),
        ({"rules": [{"name": "a", "warmup_start": 2.0}]}, "rules.0.warmup_start"),
        ({"rules": [{"name": "a", "optimizer": "rmsprop"}]}, "rules.0.optimizer.*rmsprop"),
        ({"metric": "f1"}, "metric.*'f1'"),
        ({"lr_grid": [0.1, -0.1]}, "lr_grid"),
        ({"processes": 3}, "global batch 16 is not divisible by processes 3"),
        ({"batch_sizes": [16, 1024]}, "global batch 1024 is larger than the 512 training samples"),
        ({"rules": [{"name": "a", "warmup": "2ep"}]}, r"rules.0.warmup: '2ep' is 64 iterations at global batch 16, "
                                                      r"longer than its run of 16 iterations"),
        ({"base": {**BASE, "optim": {"lr": -1}}}, "base: optim.lr"),
        ({"base": {**BASE, "data": {"name": "synthetic", "eval_size": 0}}}, "eval_accuracy needs an eval set"),
        ({"samples": 4096, "batch_sizes": [16, 256],
          "rules": [{"name": "r", "batch_ramp": {"start": 16, "over": "512sp"}}]},
         r"rules.0.batch_ramp: at global batch 256: batch.schedule\[\d+\] .* would get no iteration"),
    ],
)
def test_bad_sweep_files_are_one_config_error_line(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        sweep_from_dict(_sweep(**changes))
    assert "\n" not in str(info.value)


def test_sweep_file_errors_name_the_file_and_base_paths_are_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "sweeps" / "s.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(_sweep(base="../base.yaml")))
    assert load_sweep(path).base.data.size == 512
    path.write_text(yaml.safe_dump(_sweep(base="../base.yaml", samples="many")))
    with pytest.raises(ConfigError, match=r"sweep file '.*s.yaml': samples: .*'many'"):
        load_sweep(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_sweep(path)


def test_the_default_sweep_file_is_valid() -> None:
    sweep = load_sweep(Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "default.yaml")
    assert sweep.spec.batch_sizes[0] <= 32 and sweep.spec.batch_sizes[-1] >= 4096
    assert {r.lr_scaling for r in sweep.spec.rules} >= {"none", "linear", "sqrt"}


def test_the_batch_science_study_expands_into_its_points(tmp_path: Path) -> None:
    """docs/batch_science.md's sweep: digits, B = 8 … 1024, three seeds, two fixed-batch rules and a ramp from 32."""
    sweep = load_sweep(Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "batch_science_digits.yaml")
    spec = sweep.spec
    assert sweep.base.data.name == "digits" and spec.samples == 60000 and spec.target is not None
    assert spec.batch_sizes == [2**i for i in range(3, 11)] and len(sweep.seeds) >= 3
    ramps = [r for r in spec.rules if r.batch_ramp is not None]
    assert len(ramps) == 1 and any(r.lr_scaling == ramps[0].lr_scaling and r.batch_ramp is None for r in spec.rules)
    points = expand_points(sweep, tmp_path)
    grid, main = [p for p in points if p.stage == "grid"], [p for p in points if p.stage == "main"]
    assert len(grid) == len(spec.lr_grid) * 3 and len(main) == len(spec.rules) * 8 * 3
    start = ramps[0].batch_ramp.start
    for p in main:
        batch, train = p.config.batch, p.config.train
        assert batch.drop_last and batch.global_batch_size == p.global_batch_size
        if p.rule == ramps[0].name and p.global_batch_size > start:
            assert batch.ramp.start == start and train.samples == spec.samples and p.same_as is None
        else:
            assert batch.ramp is None and train.iterations == iterations_for_budget(spec.samples, p.global_batch_size)
        if p.global_batch_size == spec.reference_batch_size:
            assert p.same_as is not None and p.same_as.stage == "grid"  # B_ref is the grid's run at the tuned lr
    assert sum(p.same_as is None for p in points) == 66  # what the header's run time is for


# ---- arithmetic ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("samples", "B", "iterations"),
                         [(200_000, 32, 6250), (200_000, 4096, 49), (256, 64, 4), (257, 64, 5), (1, 4096, 1)])
def test_sample_budget_gives_ceil_samples_over_B_iterations(samples: int, B: int, iterations: int) -> None:
    assert iterations_for_budget(samples, B) == iterations


@pytest.mark.parametrize(
    ("B", "W", "cap", "two", "b"),
    [(32, 1, 256, False, 32), (32, 1, 256, True, 16), (4096, 1, 256, True, 256), (4096, 2, 256, False, 256),
     (96, 2, 64, False, 48), (48, 1, 40, False, 24), (1, 1, 8, True, 1), (64, 2, 256, True, 16)],
)
def test_micro_batch_is_the_largest_divisor_under_the_cap(B: int, W: int, cap: int, two: bool, b: int) -> None:
    assert micro_batch_for(B, W, cap, two_micro_steps=two) == b


# ---- point expansion -------------------------------------------------------------------------------------
def test_points_carry_budget_batch_and_rule(tmp_path: Path) -> None:
    sweep = sweep_from_dict(_sweep(rules=[{"name": "none"}, {"name": "lin", "lr_scaling": "linear", "warmup": "64sp"},
                                          {"name": "sq", "lr_scaling": "sqrt", "warmup": "64sp", "warmup_start": 0.5},
                                          {"name": "lamb", "lr_scaling": "sqrt", "optimizer": "lamb", "lr": 0.01}]))
    points = {(p.rule, p.global_batch_size): p for p in expand_points(sweep, tmp_path, base_lr=0.2)}
    assert len(points) == 8
    lin = points[("lin", 64)].config
    assert lin.batch.model_dump(exclude_unset=True) == {"micro_batch_size": 8, "global_batch_size": 64,
                                                        "drop_last": True}
    assert lin.batch.grad_accum_steps is None
    assert lin.train.iterations == 4 and lin.train.noise_scale is True
    assert lin.optim.model_dump().items() >= {"lr": 0.2, "base_batch_size": 16, "lr_scaling": "linear",
                                              "warmup": "64sp", "warmup_start_factor": 0.25}.items()  # Goyal et al.
    assert points[("sq", 64)].config.optim.warmup_start_factor == 0.5
    assert points[("lamb", 64)].config.optim.model_dump().items() >= {"name": "lamb", "lr": 0.01}.items()
    assert points[("none", 16)].config.train.iterations == 16
    assert points[("none", 16)].config.batch.micro_batch_size == 8  # k = 2: B_simple from micro-batches
    assert str(points[("lin", 64)].run_dir).startswith(str(tmp_path))


def test_runs_that_are_the_same_at_b_ref_are_trained_once(tmp_path: Path) -> None:
    sweep = sweep_from_dict(_sweep(lr_grid=[0.05, 0.1], rules=[
        {"name": "none"}, {"name": "lin", "lr_scaling": "linear", "warmup": "64sp"},
        {"name": "sq", "lr_scaling": "sqrt"}, {"name": "late", "lr_scaling": "linear", "warmup": "64sp",
                                               "warmup_start": 0.0}]))
    points = expand_points(sweep, tmp_path, base_lr=0.1)
    grid = [p for p in points if p.stage == "grid"]
    at_ref = {p.rule: p for p in points if p.stage == "main" and p.global_batch_size == 16}
    # at B_ref every rule gives the base lr and a warmup from the base lr is no warmup: the grid's lr=0.1 run
    assert at_ref["none"].same_as is grid[1] and at_ref["lin"].same_as is grid[1] and at_ref["sq"].same_as is grid[1]
    assert at_ref["late"].same_as is None  # a warmup from 0 changes the run, even at B_ref
    assert all(p.same_as is None for p in points if p.global_batch_size == 64)


def test_processes_change_the_split_not_the_batch(tmp_path: Path) -> None:
    sweep = sweep_from_dict(_sweep())
    one = expand_points(sweep, tmp_path, world_size=1)
    two = expand_points(sweep, tmp_path, world_size=2)
    for p1, p2 in zip(one, two, strict=True):
        assert p1.config.batch.global_batch_size == p2.config.batch.global_batch_size
        assert p1.config.train.iterations == p2.config.train.iterations
        assert p1.fingerprint() != p2.fingerprint()  # a rerun with another W trains again


# ---- verdict ---------------------------------------------------------------------------------------------
def _row(rule: str, B: int, acc: float | None, loss: float | None = None, noise: float | None = None
         ) -> PointResult:
    return PointResult(stage="main", rule=rule, global_batch_size=B, eval_accuracy=acc, eval_loss=loss,
                       final_train_loss=loss, grad_noise_scale=noise,
                       status="finished" if acc is not None else "diverged")


HAND_MADE = [
    _row("none", 32, 0.93, noise=700.0), _row("none", 64, 0.90), _row("none", 128, 0.70),
    _row("linear", 32, 0.93, noise=700.0), _row("linear", 64, 0.931), _row("linear", 128, 0.925),
    _row("linear", 256, 0.91), _row("linear", 512, 0.928), _row("linear", 1024, None),
    _row("sqrt", 128, 0.925), _row("sqrt", 32, 0.93), _row("sqrt", 64, 0.9205),
    replace(_row("grid", 32, 0.99), stage="grid"),
]


def test_verdict_is_the_largest_batch_up_to_which_every_point_holds() -> None:
    out = {v.rule: asdict(v) for v in verdicts(HAND_MADE, "eval_accuracy", 0.01)}
    assert set(out) == {"none", "linear", "sqrt"}  # grid rows are not rules
    assert out["none"].items() >= {"reference_batch_size": 32, "reference_value": 0.93, "largest_batch_size": 32,
                                   "breaks_at": 64, "noise_scale": 700.0}.items()
    # 512 is within tolerance again, but 256 broke first: the rule "holds up to" 128
    assert (out["linear"]["largest_batch_size"], out["linear"]["breaks_at"]) == (128, 256)
    assert out["linear"]["within_tolerance"] == [32, 64, 128, 512]
    assert (out["sqrt"]["largest_batch_size"], out["sqrt"]["breaks_at"]) == (128, None)  # rows in any order
    assert out["sqrt"]["noise_scale"] is None


def test_verdict_follows_the_metric_direction_and_treats_divergence_as_failure() -> None:
    rows = [_row("r", 16, 0.5, loss=0.20), _row("r", 32, 0.5, loss=0.24), _row("r", 64, 0.5, loss=0.26),
            replace(_row("r", 128, None), final_train_loss=float("nan"))]
    (v,) = verdicts(rows, "eval_loss", 0.05)
    assert (v.largest_batch_size, v.breaks_at, v.within_tolerance) == (32, 64, [16, 32])
    (v,) = verdicts(rows, "train_loss", 0.1)
    assert (v.largest_batch_size, v.breaks_at) == (64, 128)
    (v,) = verdicts([_row("r", 16, None), _row("r", 32, 0.9)], "eval_accuracy", 0.1)
    assert (v.reference_value, v.largest_batch_size, v.breaks_at) == (None, None, 16)
    failed = replace(_row("r", 32, None), status="failed")  # the run broke, not the rule: not judged
    (v,) = verdicts([_row("r", 16, 0.9), failed, _row("r", 64, 0.9)], "eval_accuracy", 0.1)
    assert (v.largest_batch_size, v.breaks_at, v.within_tolerance) == (64, None, [16, 64])


def test_steps_to_target_is_the_first_iteration_that_reaches_it() -> None:
    curve = [(10, 0.5), (20, None), (30, 0.8), (40, 0.9)]
    assert steps_to_target(curve, 0.8, "eval_accuracy") == 30
    assert steps_to_target(curve, 0.95, "eval_accuracy") is None
    assert steps_to_target([(5, 2.0), (9, 0.7)], 1.0, "eval_loss") == 9


def test_default_target_is_what_the_reference_runs_reach_at_half_their_budget() -> None:
    def ref(values: list[float]) -> list[CurvePoint]:
        return [CurvePoint(iteration=i + 1, samples_seen=10 * (i + 1), value=v) for i, v in enumerate(values)]

    assert default_target([ref([0.1, 0.5, 0.7, 0.8]), ref([0.2, 0.4, 0.9, 0.95])], "eval_accuracy") == 0.4
    assert default_target([], "eval_accuracy") is None


# ---- resumability and outputs (tiny real runs in this process) ------------------------------------------
def _tiny(tmp_path: Path, model: dict | None = None, **changes) -> Path:
    base = {**BASE, "model": model or {"name": "linear", "dtype": "float64"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_sweep(base=base, noise_scale=False, evals=2, **changes)))
    return path


def test_a_rerun_skips_finished_points_and_retrains_changed_ones(tmp_path: Path, capsys) -> None:
    sweep, out = load_sweep(_tiny(tmp_path)), tmp_path / "out"
    first = run_sweep(sweep, out)
    assert (first.trained, first.skipped) == (3, 0)  # B_ref shared by both rules
    points = expand_points(sweep, out)
    assert all(is_finished(p) for p in points)
    metrics = {p.run_dir: (p.run_dir / "metrics.jsonl").read_text() for p in points}
    again = run_sweep(sweep, out)
    assert (again.trained, again.skipped) == (0, 3)
    assert {p.run_dir: (p.run_dir / "metrics.jsonl").read_text() for p in points} == metrics
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert again.verdicts == first.verdicts

    changed = load_sweep(_tiny(tmp_path, rules=[{"name": "none"}, {"name": "linear+warmup", "lr_scaling": "linear",
                                                                   "warmup": "128sp"}]))
    third = run_sweep(changed, out)
    assert (third.trained, third.skipped) == (1, 2)  # only the point whose config changed
    rows = (out / "points" / "linear-warmup" / "B00064" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"train"' in r]) == 4  # cleared, not appended to


def test_a_point_with_a_summary_but_another_config_is_not_finished(tmp_path: Path) -> None:
    sweep = sweep_from_dict(_sweep())
    point = expand_points(sweep, tmp_path)[0]
    point.run_dir.mkdir(parents=True)
    (point.run_dir / "summary.json").write_text("{}")
    assert not is_finished(point)  # no marker
    (point.run_dir / "point.json").write_text(json.dumps({"fingerprint": point.fingerprint(), "status": "finished"}))
    assert is_finished(point)
    (point.run_dir / "summary.json").write_text(json.dumps({"halted": True}))
    assert not is_finished(point)
    (point.run_dir / "summary.json").write_text("{}")
    point.config.train.iterations += 1
    assert not is_finished(point)


def test_cli_dry_run_lists_points_and_bad_files_exit_2(tmp_path: Path, capsys) -> None:
    path = _tiny(tmp_path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[main] B=64 linear+warmup: W=1" in out and "same run as B=16 none" in out
    assert not (tmp_path / "o").exists()
    path.write_text(yaml.safe_dump(_sweep(batch_sizes=[16, 16])))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep file") and err.count("\n") == 1
    assert main(["sweep", str(_tiny(tmp_path)), "--processes", "3"]) == 2


def test_a_diverged_point_is_recorded_judged_and_not_retrained(tmp_path: Path) -> None:
    path = _tiny(tmp_path, model={"name": "mlp", "hidden": [4]}, rules=[{"name": "boom", "lr": 1e30}])
    out = tmp_path / "out"
    first = run_sweep(load_sweep(path), out)
    assert first.trained == 2 and not first.failed
    (v,) = first.verdicts
    assert (v.reference_value, v.largest_batch_size, v.breaks_at) == (None, None, 16)
    marker = json.loads((out / "points" / "boom" / "B00016" / "point.json").read_text())
    assert marker["status"] == "diverged" and "non-finite" in marker["error"]
    assert "diverged" in (out / "results.csv").read_text()
    assert run_sweep(load_sweep(path), out).skipped == 2


# ---- typed records and the divergence verdict ----------------------------------------------------------------
def test_results_are_typed_records_whose_fields_are_the_csv_columns(tmp_path: Path) -> None:
    from ddp_toolkit.sweep.results import COLUMNS

    sweep, out = load_sweep(_tiny(tmp_path)), tmp_path / "out"
    run_sweep(sweep, out)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header == COLUMNS and "curves" not in header and not any(c.startswith("_") for c in header)
    result = PointResult(stage="main", rule="r", global_batch_size=16, status="finished", eval_accuracy=float("nan"),
                         final_train_loss=0.5)
    assert result.value("eval_accuracy") is None and result.value("train_loss") == 0.5
    assert result.csv_row()["eval_loss"] == ""


def _diverging_config(tmp_path: Path):
    from ddp_toolkit.config import validate

    raw = {**BASE, "run_dir": str(tmp_path / "run"), "model": {"name": "mlp", "hidden": [4]},
           "optim": {"name": "sgd", "lr": 1e30, "momentum": 0.0}, "train": {"seed": 1, "iterations": 8},
           "report": {"console": False}}
    return validate(raw)


def test_divergence_is_read_from_the_error_type_the_trainer_raised(tmp_path: Path) -> None:
    from ddp_toolkit.sweep.execution import OUTCOME, train_recording

    cfg = _diverging_config(tmp_path)
    outcome = train_recording(cfg)
    assert outcome["status"] == "diverged" and outcome["error"].startswith("TrainingStopped: ")
    assert json.loads((tmp_path / "run" / OUTCOME).read_text()) == outcome
    fine = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 0.01})})
    assert train_recording(fine)["status"] == "finished"


def test_a_launched_worker_records_the_outcome_and_bugs_are_not_failed_points(tmp_path: Path, monkeypatch) -> None:
    from ddp_toolkit.sweep import execution, worker

    cfg = _diverging_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert worker.main([str(path)]) == 1  # what each rank of a launched point runs
    assert json.loads((tmp_path / "run" / execution.OUTCOME).read_text())["status"] == "diverged"

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in the toolkit")

    monkeypatch.setattr("ddp_toolkit.trainer.train_from_config", bug)
    with pytest.raises(ZeroDivisionError):  # not swallowed into a "failed" point
        execution.train_recording(cfg)


@pytest.mark.parametrize(("outcome", "code", "status"), [({"status": "diverged", "error": "TrainingStopped: x"}, 1,
                                                          "diverged"),
                                                         ({"status": "finished"}, 0, "finished"),
                                                         (None, 1, "failed")])
def test_a_launched_point_takes_its_status_from_the_recorded_outcome(tmp_path: Path, monkeypatch, outcome, code,
                                                                    status) -> None:
    from ddp_toolkit.sweep import execution

    point = expand_points(sweep_from_dict(_sweep()), tmp_path, world_size=2)[0]

    def launched(p):
        (p.run_dir / "launch.log").write_text("loss is non-finite\n")  # log text says nothing to the verdict
        if outcome is not None:
            (p.run_dir / execution.OUTCOME).write_text(json.dumps(outcome))
        return code

    monkeypatch.setattr(execution, "_train_launched", launched)
    assert execution.run_point(point) == status
    marker = json.loads((point.run_dir / execution.MARKER).read_text())
    assert marker["status"] == status and (status != "failed" or "exited with 1" in marker["error"])


# ---- seeds, intervals and the critical batch size --------------------------------------------------------
@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 9, 10, 29, 30, 100])
def test_t_quantile_matches_scipy_or_the_table(df: int) -> None:
    from ddp_toolkit.sweep import t_quantile

    table = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 6: 2.4469119, 9: 2.2621572,
             10: 2.2281389, 29: 2.0452296, 30: 2.0422725, 100: 1.9839715}
    try:
        from scipy import stats
    except ImportError:
        expected = table[df]
    else:
        expected = float(stats.t.ppf(0.975, df))
        assert expected == pytest.approx(table[df], abs=1e-6)
    assert t_quantile(df) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("values", [[1.0, 2.0], [0.91, 0.93, 0.92], [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]])
def test_mean_interval_is_the_student_t_interval(values: list[float]) -> None:
    import numpy as np

    from ddp_toolkit.sweep import mean_interval

    got = mean_interval(values)
    x = np.asarray(values)
    sem = x.std(ddof=1) / np.sqrt(len(x))
    try:
        from scipy import stats
    except ImportError:
        low, high = x.mean() - {2: 12.7062047, 3: 4.3026527, 8: 2.3646243}[len(x)] * sem, None
    else:
        low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sem)
    assert got.mean == pytest.approx(x.mean()) and got.n == len(x)
    assert got.low == pytest.approx(low, rel=1e-6)
    if high is not None:
        assert got.high == pytest.approx(high, rel=1e-6)
    assert mean_interval([0.5]).half_width is None


@pytest.mark.parametrize(("b_crit", "s_min"), [(300.0, 120.0), (2048.0, 40.0), (50.0, 1000.0)])
def test_the_critical_batch_size_is_recovered_from_a_steps_to_target_table(b_crit: float, s_min: float) -> None:
    from ddp_toolkit.sweep import fit_critical_batch

    Bs = [32, 64, 128, 256, 512, 1024, 2048, 4096]
    # S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018), rounded up to whole steps and with ±2 % noise
    noise = [1.02, 0.98, 1.01, 0.99, 1.0, 1.02, 0.985, 1.0]
    steps = [math.ceil(s_min * (1 + b_crit / B) * e) for B, e in zip(Bs, noise, strict=True)]
    fit = fit_critical_batch(Bs, steps)
    assert fit is not None and fit.points == len(Bs)
    assert fit.critical_batch_size == pytest.approx(b_crit, rel=0.05)
    assert fit.min_steps == pytest.approx(s_min, rel=0.05)
    assert fit_critical_batch([32, 64], steps[:2]) is None  # two points determine no fit worth reporting
    assert fit_critical_batch(Bs, [100] * len(Bs)) is None  # flat: no B_crit > 0


def _seeded(rule: str, B: int, values: list[float | None]) -> list[PointResult]:
    return [PointResult(stage="main", rule=rule, global_batch_size=B, seed=s, eval_accuracy=v,
                        status="finished" if v is not None else "diverged") for s, v in enumerate(values)]


def test_with_seeds_the_verdict_uses_the_interval_of_the_paired_difference() -> None:
    ref = [0.90, 0.92, 0.94]
    rows = (_seeded("r", 16, ref) + _seeded("r", 32, [v - 0.001 for v in ref])  # tight: holds
            + _seeded("r", 64, [0.90, 0.90, 0.95]) + _seeded("r", 128, [0.5, 0.5, 0.5]))
    (v,) = verdicts(rows, "eval_accuracy", 0.01)
    # at 64 the differences are 0, -0.02, +0.01: mean -0.0033 ± 0.038 straddles -0.01: cannot decide
    assert (v.largest_batch_size, v.breaks_at, v.undecided_at) == (32, None, 64)
    assert v.within_tolerance == [16, 32] and v.seeds == 3
    assert v.reference_value == pytest.approx(0.92)
    rows = _seeded("r", 16, ref) + _seeded("r", 32, [v - 0.05 for v in ref]) + _seeded("r", 64, [0.9, None, 0.9])
    (v,) = verdicts(rows, "eval_accuracy", 0.01)
    assert (v.largest_batch_size, v.breaks_at, v.undecided_at, v.within_tolerance) == (16, 32, None, [16])


def test_seeds_multiply_the_points_and_keep_shared_runs_shared(tmp_path: Path) -> None:
    sweep = sweep_from_dict(_sweep(seeds=[3, 4]))
    points = expand_points(sweep, tmp_path)
    assert len(points) == 8 and {p.seed for p in points} == {3, 4}
    assert {p.config.train.seed for p in points if p.seed == 4} == {4}
    at_ref = [p for p in points if p.global_batch_size == 16 and p.rule == "linear+warmup"]
    assert [p.same_as.seed for p in at_ref] == [3, 4]  # the none rule's run of the same seed
    assert points[1].run_dir.name == "B00016-s4" and "seed=4" in points[1].label
    with pytest.raises(ConfigError, match="seeds: seeds must be distinct"):
        sweep_from_dict(_sweep(seeds=[1, 1]))


def test_a_seeded_sweep_reports_means_intervals_and_the_target(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_sweep(load_sweep(_tiny(tmp_path, seeds=[1, 2], batch_sizes=[16, 32, 64])), out)
    assert (report.trained, report.seeds) == (10, [1, 2])  # 3 B × 2 rules × 2 seeds, B_ref shared
    md = (out / "results.md").read_text()
    assert "seeds 1, 2" in md and " ± " in md and "first B undecided" in md
    assert "Steps-to-target: the first evaluated iteration" in md and "B_crit" in md
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[0].split(",")[3] == "seed"
    assert json.loads((out / "verdict.json").read_text())["seeds"] == [1, 2]
