"""A newcomer's first hour: every shipped config takes a short smoke length, overrides have one meaning, counts
are worded right. In-process, no torch import except where the digits set is counted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ddp_toolkit.cli import main
from ddp_toolkit.config import load_config
from ddp_toolkit.config_plan import milestone_iterations, warmup_iterations
from ddp_toolkit.duration import Duration
from ddp_toolkit.lr import Schedule, scaled_lr
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.text import count, plural

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("sweeps", "accelerate"))


def test_there_are_shipped_configs():
    assert CONFIGS / "default.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
@pytest.mark.parametrize("iterations", [1, 5, 200])
def test_every_shipped_config_takes_a_smoke_length(capsys, path, iterations):
    cfg = load_config(path, [f"train.iterations={iterations}"])
    assert cfg.train.stop == Duration.iterations(iterations)
    assert main(["plan", str(path), f"train.iterations={iterations}", "--world-size", "2"]) == 0
    capsys.readouterr()
    # the schedule the trainer builds from the same helpers is valid
    o, plan = cfg.optim, BatchPlan.solve(cfg.data.size, global_batch_size=cfg.batch.global_batch_size,
                                         micro_batch_size=cfg.batch.micro_batch_size, world_size=2)
    warmup, note = warmup_iterations(cfg, plan, iterations)
    milestones, _ = milestone_iterations(cfg, plan, iterations)
    peak = scaled_lr(o.lr, plan.global_batch_size, o.base_batch_size or plan.global_batch_size, o.lr_scaling)
    Schedule(peak_lr=peak, total_iterations=iterations, warmup_iterations=warmup, decay=o.schedule,
             warmup_start_factor=o.warmup_start_factor, step_milestones=milestones, min_lr=min(o.min_lr, peak))
    assert warmup <= iterations and (note is None) == (plan.iterations_in(o.warmup) <= iterations)


def test_a_warmup_longer_than_the_run_is_cut_with_a_note():
    cfg = load_config(CONFIGS / "default.yaml", ["train.iterations=5", "optim.schedule=step",
                                                  "optim.step_milestones=[3it, 2ep]"])
    plan = BatchPlan.solve(4096, global_batch_size=128, micro_batch_size=32, world_size=2)
    assert warmup_iterations(cfg, plan, 5) == (5, "optim.warmup 1ep is 32 iterations, longer than the run of "
                                                   "5 iterations: the warmup lasts the whole run")
    milestones, note = milestone_iterations(cfg, plan, 5)
    assert milestones == () and "3it (iteration 3), 2ep (iteration 64) are not inside the run" in note


def test_command_line_overrides_replace_the_files_run_length():
    cfg = load_config(CONFIGS / "default.yaml", ["train.iterations=20"])
    assert (cfg.train.epochs, cfg.train.iterations, str(cfg.train.stop)) == (None, 20, "20it")


def test_digits_size_matches_the_data_set():
    pytest.importorskip("sklearn")
    from ddp_toolkit.config_plan import DIGITS_TRAIN_SIZE
    from ddp_toolkit.data import digits

    assert len(digits()[0]) == DIGITS_TRAIN_SIZE


def test_plural():
    assert [count(1, "device"), count(2, "device"), count(1.0, "epoch"), count(0.5, "epoch")] == \
        ["1 device", "2 devices", "1 epoch", "0.5 epochs"]
    assert [plural(1, "batch"), plural(3, "batch"), plural(2, "cell"), count(6000, "iteration")] == \
        ["batch", "batches", "cells", "6,000 iterations"]


ONE = re.compile(r"(?<![\d.,])1 (devices|epochs|iterations|samples|cells|batches|weight updates|accumulation steps)\b")


@pytest.mark.parametrize("args", [
    ["--dataset-size", "10", "--micro-batch-size", "10", "--epochs", "1"],
    ["--dataset-size", "11", "--micro-batch-size", "10", "--world-size", "1", "--iterations", "1"],
    ["--dataset-size", "10", "--micro-batch-size", "1", "--samples", "1", "--grad-accum-steps", "1"],
    ["--dataset-size", "21", "--micro-batch-size", "4", "--world-size", "5", "--epochs", "1"],
])
@pytest.mark.parametrize("output", [[], ["--explain"], ["--verbose"]])
def test_counts_of_one_are_singular(capsys, args, output):
    assert main(["plan", *args, *output]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert not ONE.search(text), ONE.search(text)
    assert "1 device" in text or "devices" in text
