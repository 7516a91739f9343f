"""The trainer's components in isolation: durations, the cell function, the checkpoint manager with fake
stateful parts, the stop vote, cadence rules, and the loop driven by a fake engine (non-finite skip, stop)."""

from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ddp_toolkit.checkpoint import CheckpointError
from ddp_toolkit.config import validate
from ddp_toolkit.data import TensorData
from ddp_toolkit.dist import DistEnv
from ddp_toolkit.duration import Duration, DurationError
from ddp_toolkit.engines.base import Engine
from ddp_toolkit.metrics import MetricsLogger
from ddp_toolkit.plan import BatchPlan, PlanError
from ddp_toolkit.progress import Progress
from ddp_toolkit.state import CheckpointManager, describe_changes
from ddp_toolkit.stopping import StopVote
from ddp_toolkit.trainer import Trainer, TrainingStopped


# ---- Duration -----------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(unit=st.sampled_from(["it", "ep", "sp"]), whole=st.integers(0, 10**9),
       frac=st.floats(0, 1e6, allow_nan=False, allow_infinity=False))
def test_duration_text_round_trips(unit: str, whole: int, frac: float) -> None:
    value = frac if unit == "ep" else whole
    d = Duration(value, unit)
    assert Duration.parse(str(d)) == d
    assert Duration.parse(d) is d


@pytest.mark.parametrize("bad", ["1.5it", "-3ep", "nan", "inf", "3 weeks", "", True, 2.5, None, [1]])
def test_duration_rejects_bad_text_with_one_line(bad: object) -> None:
    with pytest.raises(DurationError) as err:
        Duration.parse(bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_duration_error_truncates_huge_text() -> None:
    with pytest.raises(DurationError) as err:
        Duration.parse("x" * 10_000)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize(("text", "iterations"), [("5ep", 500), ("0.5ep", 50), ("1000sp", 4), ("7", 7),
                                                  ("7it", 7), ("25600sp", 100)])
def test_durations_convert_only_through_the_plan(text: str, iterations: int) -> None:
    plan = BatchPlan(25_600, 64, 2, 2)  # B = 256, 100 iterations per epoch
    assert plan.iterations_in(text) == plan.iterations_in(Duration.parse(text)) == iterations


# ---- the cell function --------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 500), b=st.integers(1, 5), w=st.integers(1, 4), k=st.integers(1, 4),
       drop_last=st.booleans())
def test_cell_ranges_tile_every_global_batch_in_layout_order(n: int, b: int, w: int, k: int, drop_last: bool) -> None:
    if drop_last and n < b * w * k:
        with pytest.raises(PlanError):
            BatchPlan(n, b, w, k, drop_last)
        return
    plan = BatchPlan(n, b, w, k, drop_last)
    position = 0
    for i in range(plan.iterations_per_epoch):
        sizes = plan.split_counts(plan.batch_size_of(i))
        for m in range(k):
            for r in range(w):
                start, stop = plan.cell_range(i, m, r)
                assert start == position and stop - start == sizes[m][r] <= b
                position = stop
        assert position == i * plan.global_batch_size + plan.batch_size_of(i)
    assert position == plan.samples_per_epoch


# ---- checkpoint manager with fake stateful parts --------------------------------------------------------------
class _Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class _FakeEngineState:
    sharded = False

    def __init__(self) -> None:
        self.weights = {"w": torch.arange(4.0)}
        self.optim = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}

    def model_state(self) -> dict:
        return self.weights

    def load_model_state(self, weights: dict, where: Path) -> None:
        self.weights = weights

    def state_dict(self) -> dict:
        return self.optim

    def load_state_dict(self, state: dict) -> None:
        self.optim = state


def _manager(root: Path, parts: dict, fingerprint: dict, **kwargs) -> CheckpointManager:
    return CheckpointManager(root, engine_state=_FakeEngineState(), states=parts, fingerprint=fingerprint, rank=0,
                             barrier=lambda: None, **kwargs)


def test_manager_saves_and_restores_every_part_it_was_given(tmp_path: Path) -> None:
    a, b = _Counter(3), _Counter(7)
    _manager(tmp_path, {"a": a, "b": b}, {"seed": 1}).save(5)
    a2, b2 = _Counter(), _Counter()
    mgr = _manager(tmp_path, {"a": a2, "b": b2}, {"seed": 1})
    path = mgr.find("auto")
    assert path is not None and path.name == "it00000005"
    mgr.load(path)
    assert (a2.value, b2.value) == (3, 7)
    assert torch.equal(mgr.engine_state.weights["w"], torch.arange(4.0))


def test_manager_refuses_another_runs_checkpoint_naming_each_change(tmp_path: Path) -> None:
    _manager(tmp_path, {"a": _Counter(1)}, {"optim.lr": 0.05, "seed": 1}).save(3)
    mgr = _manager(tmp_path, {"a": _Counter()}, {"optim.lr": 0.2, "seed": 1})
    with pytest.raises(CheckpointError, match=r"optim.lr 0.05 → 0.2") as err:
        mgr.load(mgr.find("auto"))
    assert err.value.exit_code == 2
    allowed = _manager(tmp_path, {"a": _Counter()}, {"optim.lr": 0.2, "seed": 1}, allow_change=True)
    allowed.load(allowed.find("auto"))
    assert allowed.states["a"].value == 1


def test_manager_cadence_and_resume_modes(tmp_path: Path) -> None:
    mgr = _manager(tmp_path, {}, {}, every=5)
    assert [i for i in range(1, 21) if mgr.should_save(i, last=i == 20)] == [5, 10, 15]
    assert not _manager(tmp_path, {}, {}, every=0).should_save(5, last=False)
    assert mgr.find("never") is None and mgr.find("auto") is None
    assert mgr.find(str(tmp_path / "x")) == tmp_path / "x"


def test_describe_changes_lists_added_removed_and_changed_keys() -> None:
    assert describe_changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b 2 → 3", "c None → 4"]


# ---- stop vote and metrics cadence -------------------------------------------------------------------------------
def test_stop_vote_local_request_from_signal_and_flag_file(tmp_path: Path) -> None:
    vote = StopVote(tmp_path, watch_file=True, check_every=3)
    assert vote.local_request() == 0.0 and not vote.stop
    assert [i for i in range(1, 10) if vote.due(i)] == [3, 6, 9]
    (tmp_path / "PREEMPT").touch()
    assert vote.local_request() == 1.0 and vote.describe() == "PREEMPT file"
    other_rank = StopVote(tmp_path, watch_file=True, is_main=False)
    assert other_rank.local_request() == 0.0  # only rank 0 looks at the disk; the vote tells the others
    vote.record(1.0)
    assert vote.stop
    unwatched = StopVote(tmp_path / "nowhere", watch_file=False)
    assert not any(unwatched.due(i) for i in range(1, 10))


def test_stop_vote_catches_sigterm_and_restores_the_handler(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    vote = StopVote(tmp_path, watch_file=False)
    vote.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert vote.local_request() == 1.0 and vote.describe() == "SIGTERM"
    finally:
        vote.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_metrics_cadence_logs_every_n_and_the_last() -> None:
    logger = MetricsLogger(reporter=None, plan=BatchPlan(100, 10, 1), progress=Progress(), every=4)
    assert [i for i in range(1, 11) if logger.should_log(i, last=i == 10)] == [4, 8, 10]


# ---- the loop with a fake engine ---------------------------------------------------------------------------------
class _FakeEngine(Engine):
    """The bare model on CPU; gradient norm from a script so non-finite iterations can be planted."""

    name = "fake"

    def __init__(self, env, plan, cfg, norms=()) -> None:
        super().__init__(env, plan, cfg)
        self.norms, self.steps, self.calls = list(norms), 0, 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def grad_norm(self) -> torch.Tensor:
        self.calls += 1
        planted = self.norms[self.calls - 1] if self.calls <= len(self.norms) else None
        return torch.tensor(planted) if planted is not None else super().grad_norm()

    def step(self) -> None:
        self.steps += 1
        super().step()


def _trainer(tmp_path: Path, norms=(), **train) -> tuple[Trainer, _FakeEngine]:
    cfg = validate({"run_dir": str(tmp_path / "run"), "data": {"size": 40, "features": 4, "eval_size": 0},
                    "model": {"hidden": [4]}, "batch": {"micro_batch_size": 10},
                    "train": {"iterations": 4, "log_every": 1, **train}, "report": {"console": False}})
    torch.manual_seed(0)
    data = TensorData(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    holder: dict = {}

    def factory(env, plan, config):
        holder["engine"] = _FakeEngine(env, plan, config, norms)
        return holder["engine"]

    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, launcher="test")
    trainer = Trainer(nn.Linear(4, 3), data, cfg, env=env, engine=factory)
    return trainer, holder["engine"]


def test_nonfinite_norm_skips_the_update_and_counts_it(tmp_path: Path) -> None:
    trainer, engine = _trainer(tmp_path, norms=[None, math.inf, None, math.nan], on_nonfinite="skip")
    summary = trainer.fit()
    assert engine.steps == 2 and summary["skipped_iterations"] == 2
    rows = [r for r in map(eval_json, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert [r["skipped_iterations"] for r in rows] == [0, 1, 1, 2]


def test_nonfinite_norm_stops_with_a_checkpoint_of_the_last_good_state(tmp_path: Path) -> None:
    trainer, engine = _trainer(tmp_path, norms=[None, None, math.inf])
    with pytest.raises(TrainingStopped, match="iteration 3") as err:
        trainer.fit()
    assert err.value.exit_code == 1 and engine.steps == 2
    assert (tmp_path / "run" / "checkpoints" / "it00000002").is_dir()


def test_flag_file_stops_after_the_current_iteration_with_a_checkpoint(tmp_path: Path) -> None:
    trainer, engine = _trainer(tmp_path)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "PREEMPT").touch()
    summary = trainer.fit()
    assert summary == {"preempted": True, "iteration": 1} and engine.steps == 1
    assert (tmp_path / "run" / "checkpoints" / "it00000001").is_dir()


def test_engine_and_reporter_are_closed_when_training_fails(tmp_path: Path) -> None:
    trainer, engine = _trainer(tmp_path, norms=[math.inf])
    closed = []
    engine.close = lambda: closed.append("engine")  # type: ignore[method-assign]
    with contextlib.suppress(TrainingStopped):
        trainer.fit()
    assert closed == ["engine"]


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


# ---- evaluation: exact sums, accuracy only where defined, a step's own metrics -----------------------------------
class _MetricStep:
    """A TupleStep with a user metric: the mean absolute logit of the true class."""

    metric_names = ("true_logit",)

    def __init__(self) -> None:
        from ddp_toolkit.step import TupleStep

        self.inner = TupleStep()
        self.item_name, self.counts_samples = "samples", True

    def count(self, batch):
        return self.inner.count(batch)

    def forward(self, model, batch):
        return self.inner.forward(model, batch)

    def metrics(self, outputs, batch):
        picked = outputs.gather(1, batch[1][:, None]).abs()
        return {"true_logit": (float(picked.sum()), len(picked))}


def test_evaluator_reports_loss_accuracy_and_a_steps_own_metric_exactly() -> None:
    from ddp_toolkit.batches import batch_as_is
    from ddp_toolkit.evaluation import Evaluator

    torch.manual_seed(0)
    data = TensorData(torch.randn(23, 4, dtype=torch.float64), torch.randint(0, 3, (23,)))
    model = nn.Linear(4, 3).double()
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, launcher="test")
    result = Evaluator(data, _MetricStep(), env, batch_size=5, collate_fn=batch_as_is).run(model)
    with torch.no_grad():
        logits = model(data.x)
    expected_loss = float(torch.nn.functional.cross_entropy(logits, data.y))
    assert result["eval_loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert result["eval_accuracy"] == float((logits.argmax(1) == data.y).double().mean())
    assert result["eval_true_logit"] == pytest.approx(float(logits.gather(1, data.y[:, None]).abs().mean()), rel=1e-12)
    assert result["eval_items"] == result["eval_samples"] == 23 and "eval_perplexity" not in result
