"""`ddp-toolkit plan` answers the classic questions exactly; bad input is one line on stderr, exit 2."""

import json
import subprocess
import sys

import pytest

from ddp_toolkit.cli import main


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("args", "expected"), [
    (["--dataset-size", "2000", "--global-batch-size", "500", "--epochs", "1"],
     {"iterations_per_epoch": 4, "global_batch_size": 500, "total_iterations": 4}),
    (["--dataset-size", "60000", "--micro-batch-size", "100", "--epochs", "10"],
     {"iterations_per_epoch": 600, "total_iterations": 6000}),
    (["--dataset-size", "60000", "--micro-batch-size", "100", "--iterations", "30000"],
     {"epochs": 50.0, "total_iterations": 30000}),
    (["--dataset-size", "1000", "--micro-batch-size", "500", "--epochs", "3"], {"total_iterations": 6}),
    (["--dataset-size", "60000", "--micro-batch-size", "25", "--world-size", "2", "--grad-accum-steps", "2",
      "--epochs", "10"], {"global_batch_size": 100, "iterations_per_epoch": 600, "total_iterations": 6000,
                          "local_batch_size": 50}),
    (["--dataset-size", "60000", "--global-batch-size", "100", "--micro-batch-size", "25", "--world-size", "2",
      "--iterations", "30000"], {"grad_accum_steps": 2, "epochs": 50.0}),
    (["--dataset-size", "1001", "--global-batch-size", "500", "--drop-last"],
     {"iterations_per_epoch": 2, "dropped_samples_per_epoch": 1, "samples_per_epoch": 1000}),
    (["--dataset-size", "1000", "--global-batch-size", "512", "--base-lr", "0.1", "--base-batch-size", "256"],
     {"scaled_lr": 0.2, "lr_rule": "linear", "base_lr": 0.1}),
    (["--dataset-size", "1000", "--global-batch-size", "1024", "--base-lr", "0.1", "--base-batch-size", "256",
      "--lr-rule", "sqrt"], {"scaled_lr": 0.2, "lr_rule": "sqrt"}),
])
def test_plan_json(capsys, args, expected):
    out = plan_json(capsys, *args)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value)


def test_plan_json_has_every_plan_key(capsys):
    out = plan_json(capsys, "--dataset-size", "1001", "--micro-batch-size", "8", "--world-size", "2",
                    "--grad-accum-steps", "4")
    for key in ("global_batch_size", "local_batch_size", "iterations_per_epoch", "micro_steps_per_epoch_per_rank",
                "samples_per_epoch", "dropped_samples_per_epoch", "last_batch_size", "last_batch_split",
                "total_iterations", "epochs"):
        assert key in out
    assert out["last_batch_size"] == 1001 - 15 * 64
    assert sum(map(sum, out["last_batch_split"])) == out["last_batch_size"]


def test_explain_answers_in_sentences(capsys):
    assert main(["plan", "--dataset-size", "60000", "--micro-batch-size", "25", "--world-size", "2",
                 "--grad-accum-steps", "2", "--epochs", "10", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "600 iterations per epoch = 600 weight updates per epoch" in text
    assert "6,000 iterations = 10 epochs" in text
    assert "global batch of 100 samples" in text


def test_table_output(capsys):
    assert main(["plan", "--dataset-size", "50000", "--global-batch-size", "512", "--micro-batch-size", "32",
                 "--world-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "global batch 512 = 32 micro × 4 devices × 4 accumulation" in text
    assert "\x1b" not in text  # plain text when not a terminal


BAD = [
    ["plan", "--dataset-size", "x"],
    ["plan"],
    ["plan", "--dataset-size", "1000", "--global-batch-size", "500", "--micro-batch-size", "24", "--world-size", "4"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "0"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "64", "--world-size", "2", "--drop-last"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "--lr-rule", "cubic", "--base-lr", "1"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "--epochs", "1", "--iterations", "3"],
    ["frobnicate"],
]


@pytest.mark.parametrize("argv", BAD)
def test_bad_input_is_one_line_exit_2(argv):
    proc = subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
