"""A batch-size schedule in real runs: three phases (one change mid-epoch) equal the concatenation of fixed-B runs
resumed from each other's checkpoints, and a run halted inside a phase resumes exactly at another world size."""

from __future__ import annotations

import pytest
import torch

from ddp_toolkit.batch_schedule import BatchSchedule
from ddp_toolkit.plan import BatchPlan
from tests.distributed.harness import final_weights, max_rel_error, metrics, small_config, spawn_train

# N = 64, b = 4. B 8 until 40sp: iterations 1-5 (40 samples, inside epoch 0); B 16 until 2ep: iterations 6-11
# (positions 40→56, a short batch of 8 ending epoch 0, then 4 full batches of epoch 1); B 32 to 3ep: 12-13.
PHASES = [{"until": "40sp", "global_batch_size": 8}, {"until": "2ep", "global_batch_size": 16},
          {"global_batch_size": 32}]
ENDS = (5, 11, 13)
COLUMNS = ("iteration", "epoch", "samples_seen", "global_batch_size", "batch_samples", "lr")


def _config(run_dir, **train):
    return small_config(run_dir, data={"size": 64}, batch={"micro_batch_size": 4, "global_batch_size": None,
                                                           "schedule": PHASES},
                        optim={"lr": 0.05, "momentum": 0.9}, train={"iterations": None, "epochs": 3, **train})


def _fixed(run_dir, size: int, iterations: int):
    return small_config(run_dir, data={"size": 64}, batch={"micro_batch_size": 4, "global_batch_size": size},
                        optim={"lr": 0.05, "momentum": 0.9},
                        train={"iterations": iterations, "resume": "auto", "allow_config_change": True})


def test_the_arithmetic_of_this_test():
    schedule = BatchSchedule.of_sizes(BatchPlan(64, 4, 1, 2), [(p["global_batch_size"], p.get("until"))
                                                               for p in PHASES])
    starts = [pos.iteration for _, pos in schedule.phase_starts(100)]
    assert starts == [0, ENDS[0], ENDS[1]] and schedule.iterations_in("3ep") == ENDS[2]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The three-phase run at W = 2 (noise scale on: it follows each phase's B and k, and never moves the weights)."""
    run_dir = tmp_path_factory.mktemp("straight")
    spawn_train(_config(run_dir, noise_scale=True), 2)
    return run_dir


def test_schedule_equals_fixed_runs_resumed_from_each_other(straight, tmp_path):
    concatenated = tmp_path / "fixed"
    for size, end in zip((8, 16, 32), ENDS, strict=True):  # each resumes the previous one's last checkpoint (W = 1)
        spawn_train(_fixed(concatenated, size, end), 1)
    a, b = metrics(straight), metrics(concatenated)
    assert [r["global_batch_size"] for r in a] == [8] * 5 + [16] * 6 + [32] * 2
    assert [r["grad_accum_steps"] for r in a] == [1] * 5 + [2] * 6 + [4] * 2  # W = 2, b = 4: k follows B
    assert [r["batch_samples"] for r in a][5:7] == [16, 8]  # the short batch that ends epoch 0
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in COLUMNS} == {k: rb[k] for k in COLUMNS}
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-9)
    assert [r["epoch"] for r in a][4:7] == [40 / 64, 56 / 64, 1.0]
    assert max_rel_error(final_weights(straight), final_weights(concatenated)) <= 1e-6
    assert all("grad_noise_scale" in r for r in a)


def test_halt_inside_a_phase_and_resume_at_another_world_size(straight, tmp_path):
    run_dir = tmp_path / "elastic"
    spawn_train(_config(run_dir, halt_at=8), 1)  # inside the B 16 phase, at W = 1 (k = 4)
    assert not (run_dir / "final" / "model.safetensors").exists()  # halted: no final weights
    spawn_train(_config(run_dir, resume="auto"), 2)  # the rest at W = 2 (k = 2, then 4)
    rows = metrics(run_dir)
    assert [r["world_size"] for r in rows] == [1] * 8 + [2] * 5
    straight_rows = metrics(straight)
    for ra, rb in zip(rows, straight_rows, strict=True):
        assert {k: ra[k] for k in COLUMNS} == {k: rb[k] for k in COLUMNS}
    a, b = final_weights(run_dir), final_weights(straight)
    assert max_rel_error(a, b) <= 1e-10 and all(a[k].dtype == torch.float64 for k in a)
