"""`ddp-toolkit sweep` end to end: 2 batch sizes × 2 rules, each point a real 2-process torch.distributed.run
job; results.csv / results.md / PNGs, skip on rerun, and the same numbers from one process with accumulation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddp_toolkit.cli import main

pytestmark = pytest.mark.distributed

SWEEP = {
    "base": {
        "run_dir": "unused",
        "data": {"name": "synthetic", "size": 512, "eval_size": 101, "features": 6, "classes": 3},
        "model": {"name": "mlp", "hidden": [8], "dtype": "float64"},
        "batch": {"micro_batch_size": 8},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"seed": 2},
    },
    "batch_sizes": [16, 64],
    "samples": 512,
    "rules": [{"name": "none", "lr_scaling": "none"},
              {"name": "linear+warmup", "lr_scaling": "linear", "warmup": "128sp"}],
    "tolerance": 0.05,
    "evals": 4,
    "processes": 2,
}


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_sweep_with_two_processes_per_point(tmp_path: Path, capsys) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SWEEP))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verdict (eval_accuracy; W = 2" in printed and "same run as" in printed

    rows = _rows(out)
    assert [(r["rule"], int(r["global_batch_size"])) for r in rows] == [
        ("none", 16), ("none", 64), ("linear+warmup", 16), ("linear+warmup", 64)]
    for r in rows:
        assert r["status"] == "finished" and r["world_size"] == "2"
        assert int(r["iterations"]) == -(-512 // int(r["global_batch_size"]))
        assert 0 <= float(r["eval_accuracy"]) <= 1 and float(r["final_train_loss"]) > 0
        assert (Path(r["run_dir"]) / "summary.json").exists()
    assert float(rows[3]["scaled_lr"]) == pytest.approx(0.05 * 64 / 16)
    assert rows[0]["run_dir"] == rows[2]["run_dir"]  # the same run at B_ref

    md = (out / "results.md").read_text()
    for text in ("## Verdict", "(W, k)-equivalence", "| linear+warmup |", "![metric_vs_batch](metric_vs_batch.png)",
                 "B_simple"):
        assert text in md
    verdict = json.loads((out / "verdict.json").read_text())
    assert (verdict["trained"], verdict["skipped"]) == (3, 0)
    assert {v["rule"] for v in verdict["verdicts"]} == {"none", "linear+warmup"}

    from matplotlib.image import imread

    for name in ("metric_vs_batch.png", "loss_vs_samples.png", "steps_to_target.png"):
        image = imread(out / name)
        assert image.size > 0 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(np.std(image[..., :3])) > 0.01, f"{name} is blank"

    before = {r["run_dir"]: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for r in rows}
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    assert json.loads((out / "verdict.json").read_text())["skipped"] == 3
    assert {r["run_dir"]: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime_ns for r in rows} == before

    # one process with accumulation trains the same runs (float64: equal up to summation order)
    single = tmp_path / "single"
    assert main(["sweep", str(path), "--out", str(single), "--processes", "1"]) == 0
    for two, one in zip(rows, _rows(single), strict=True):
        assert one["world_size"] == "1" and int(one["grad_accum_steps"]) >= 2
        assert float(one["eval_loss"]) == pytest.approx(float(two["eval_loss"]), rel=1e-9)
        assert float(one["final_train_loss"]) == pytest.approx(float(two["final_train_loss"]), rel=1e-9)


def test_a_launched_point_that_diverges_is_recorded_from_the_trainers_error(tmp_path: Path) -> None:
    boom = {**SWEEP, "batch_sizes": [16], "rules": [{"name": "boom", "lr": 1e30}], "evals": 1}
    path = tmp_path / "boom.yaml"
    path.write_text(yaml.safe_dump(boom))
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    run_dir = out / "points" / "boom" / "B00016"
    outcome = json.loads((run_dir / "outcome.json").read_text())  # written by rank 0 of the launched run
    assert outcome["status"] == "diverged" and outcome["error"].startswith("TrainingStopped: ")
    assert json.loads((run_dir / "point.json").read_text())["status"] == "diverged"
    ((row,),) = [_rows(out)]
    assert row["status"] == "diverged" and row["eval_accuracy"] == ""
    (v,) = json.loads((out / "verdict.json").read_text())["verdicts"]
    assert (v["reference_value"], v["largest_batch_size"], v["breaks_at"]) == (None, None, 16)
