"""`ddp-toolkit plan` answers the classic questions exactly, from flags or from a config; `ddp-toolkit config`
shows and documents every key. Bad input is one line on stderr, exit 2. All in-process (no torch import)."""

import json
from pathlib import Path

import pytest
import yaml

from ddp_toolkit.cli import main
from ddp_toolkit.config import DEFAULT_CONFIG, OptimConfig, validate
from ddp_toolkit.config_doc import render_markdown
from ddp_toolkit.plan_report import PLAN_FIELDS

REPO = Path(__file__).resolve().parents[2]


def plan_json(capsys, *args) -> dict:
    """The JSON plan; what went to stderr is kept under the key `_stderr`."""
    assert main(["plan", *args, "--json"]) == 0
    captured = capsys.readouterr()
    return {**json.loads(captured.out), "_stderr": captured.err}


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
    (["--dataset-size", "1000", "--global-batch-size", "512", "--base-lr", "0.1", "--base-batch-size", "256",
      "--lr-rule", "linear"], {"scaled_lr": 0.2, "lr_rule": "linear", "base_lr": 0.1}),
    (["--dataset-size", "1000", "--global-batch-size", "1024", "--base-lr", "0.1", "--base-batch-size", "256",
      "--lr-rule", "sqrt"], {"scaled_lr": 0.2, "lr_rule": "sqrt"}),
    (["--dataset-size", "1000", "--micro-batch-size", "10", "--samples", "2500"], {"total_iterations": 250}),
])
def test_plan_json(capsys, args, expected):
    out = plan_json(capsys, *args)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value)


def test_plan_json_keys_are_the_documented_ones(capsys):
    out = plan_json(capsys, "--dataset-size", "1001", "--micro-batch-size", "8", "--world-size", "2",
                    "--grad-accum-steps", "4")
    optional = {"scaling", "batch_schedule"}  # only with --bandwidth, only with a batch-size schedule
    assert [k for k in out if k != "_stderr"] == [k for k in PLAN_FIELDS if k not in optional]
    assert out["last_batch_size"] == 1001 - 15 * 64
    with_bandwidth = plan_json(capsys, "--dataset-size", "1001", "--micro-batch-size", "8", "--world-size", "2",
                               "--grad-accum-steps", "4", "--bandwidth", "25GB/s", "--grad-bytes", "4000000",
                               "--micro-step-ms", "10")
    assert [k for k in with_bandwidth if k != "_stderr"] == [k for k in PLAN_FIELDS if k != "batch_schedule"]
    assert sum(map(sum, out["last_batch_split"])) == out["last_batch_size"]


def test_lr_rule_default_is_the_config_default(capsys):
    out = plan_json(capsys, "--dataset-size", "1000", "--micro-batch-size", "8", "--base-batch-size", "4")
    assert out["lr_rule"] == OptimConfig().lr_scaling == "none" and out["scaled_lr"] == out["base_lr"]


def test_several_lr_rules_side_by_side(capsys):
    args = ["--dataset-size", "1000", "--global-batch-size", "1024", "--base-lr", "0.1", "--base-batch-size", "256"]
    out = plan_json(capsys, *args, "--lr-rule", "none", "linear", "sqrt")
    assert out["scaled_lr_by_rule"] == pytest.approx({"none": 0.1, "linear": 0.4, "sqrt": 0.2})
    assert main(["plan", *args, "--lr-rule", "linear", "--lr-rule", "sqrt"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "0.4 (linear), 0.2 (sqrt) at batch 1024" in text and "[optim.base_batch_size]" in text


def test_a_rule_without_reference_batch_warns_and_says_which_batch_it_used(capsys):
    out = plan_json(capsys, "--dataset-size", "1000", "--micro-batch-size", "8", "--lr-rule", "linear")
    assert out["base_batch_size"] == 8 and out["base_batch_size_from"].startswith("the global batch")
    assert out["warnings"] and "optim.base_batch_size is not set" in out["warnings"][0]
    assert "warning: optim.lr_scaling is linear" in out["_stderr"]


def test_last_of_epochs_iterations_samples_wins(capsys):
    base = ["--dataset-size", "100", "--micro-batch-size", "10"]
    assert plan_json(capsys, *base, "--epochs", "1", "--iterations", "3")["total_iterations"] == 3
    assert plan_json(capsys, *base, "--iterations", "3", "--epochs", "1")["total_iterations"] == 10
    assert plan_json(capsys, *base, "--json", "--explain", "--json", "--samples", "20")["total_iterations"] == 2


def test_plan_from_a_config(capsys):
    out = plan_json(capsys, str(DEFAULT_CONFIG), "--world-size", "2", "train.iterations=20")
    assert (out["dataset_size"], out["global_batch_size"], out["grad_accum_steps"]) == (4096, 128, 4)
    assert out["total_iterations"] == 20 and out["stop"] == "20it"
    assert out["warmup_iterations"] == 20 and "warmup lasts the whole run" in out["notes"][0]
    assert out["eval_every_iterations"] == out["checkpoint_every_iterations"] == 32
    assert out["scaled_lr"] == pytest.approx(0.05 * 128 / 32) and out["base_batch_size_from"] == "optim.base_batch_size"
    assert "note: optim.warmup 1ep is 32 iterations" in out["_stderr"]
    digits = plan_json(capsys, "data.name=digits", "batch.micro_batch_size=100")
    assert digits["dataset_size"] == 1437 and digits["iterations_per_epoch"] == 15


@pytest.mark.parametrize(("flags", "factors"), [
    ([], (128, 16, 1, 8)),
    (["--world-size", "4"], (128, 16, 4, 2)),
    (["--micro-batch-size", "32"], (128, 32, 1, 4)),
    (["--grad-accum-steps", "8", "--world-size", "2"], (256, 16, 2, 8)),  # the flag wins over the config's B
    (["--global-batch-size", "64", "--world-size", "2"], (64, 16, 2, 2)),
    (["--grad-accum-steps", "2"], (128, 16, 4, 2)),  # W derived from the config's B and b
])
def test_batch_flags_override_the_config(capsys, flags, factors):
    out = plan_json(capsys, str(DEFAULT_CONFIG), *flags)
    assert (out["global_batch_size"], out["micro_batch_size"], out["world_size"], out["grad_accum_steps"]) == factors


def test_milestones_and_cadences_in_iterations(capsys):
    out = plan_json(capsys, "--dataset-size", "1000", "--micro-batch-size", "100", "--epochs", "3",
                    "optim.schedule=step", "optim.step_milestones=[1ep, 15it, 5ep]", "train.eval_every=500sp",
                    "train.checkpoint_every=2ep")
    assert out["step_milestones_iterations"] == [10, 15]
    assert "5ep (iteration 50) is not inside the run" in out["notes"][0]
    assert (out["eval_every_iterations"], out["checkpoint_every_iterations"]) == (5, 20)


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


def test_last_batch_split_is_summarised_and_verbose_shows_it_all(capsys):
    # B = 32 × 8 × 16 = 4096; N = 4096 + 3966: the last batch of 3966 fills 126 cells with 31 and 2 with 30
    args = ["plan", "--dataset-size", "8062", "--micro-batch-size", "32", "--world-size", "8",
            "--grad-accum-steps", "16"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "16 × 8 cells (micro_steps × ranks): 31 samples each, except 2 cells of 30" in " ".join(text.split())
    assert "[[31" not in text
    assert main([*args, "--verbose"]) == 0
    assert "[[31, 31" in capsys.readouterr().out


BAD = [
    ["plan", "--dataset-size", "x"],
    ["plan"],
    ["plan", "--dataset-size", "1000", "--global-batch-size", "500", "--micro-batch-size", "24", "--world-size", "4"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "0"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "64", "--world-size", "2", "--drop-last"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "--lr-rule", "cubic", "--base-lr", "1"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "--epochs", "nan"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "--base-lr", "inf"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "optim.lr=.nan"],
    ["plan", "--dataset-size", "100", "--micro-batch-size", "8", "--lr-rule", "x" * 5000],
    ["plan", "no/such/config.yaml"],
    ["config", "show", "optim.lrr=1"],
    ["config", "frobnicate"],
    ["frobnicate"],
]


@pytest.mark.parametrize("argv", BAD)
def test_bad_input_is_one_line_exit_2(capsys, argv):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) < 500, lines


def test_config_show_is_the_resolved_config_with_descriptions(capsys):
    assert main(["config", "show", str(DEFAULT_CONFIG), "train.iterations=20", "optim.lr=1e-3"]) == 0
    text = capsys.readouterr().out
    assert "  iterations: 20" in text and "  epochs: null" in text
    assert "# Learning rate at the reference batch optim.base_batch_size." in text
    cfg = validate(yaml.safe_load(text))  # the output loads back to the same config
    assert cfg.train.iterations == 20 and cfg.optim.lr == 1e-3 and cfg.train.epochs is None


def test_config_doc_is_up_to_date(capsys):
    """docs/config.md is generated: run `ddp-toolkit config doc > docs/config.md` after changing config.py."""
    assert main(["config", "doc"]) == 0
    printed = capsys.readouterr().out
    assert printed == render_markdown()
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == printed, \
        "docs/config.md is out of date: run `ddp-toolkit config doc > docs/config.md`"
