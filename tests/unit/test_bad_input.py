"""The bad-input catalogue: every malformed input through the CLI is one line on stderr, exit code 2 (the
documented code for bad input), no traceback; run in-process through the CLI entry point (the point is the
message, not the process). A warmup longer than the run is not bad input: it is cut to the run with a note;
two run lengths are not either: the last one given wins. Every key and flag is also covered as a property in
test_bad_input_property.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.distributed.harness import REPO, small_config


def run_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    raw = small_config(root / "run", train={"iterations": 6, "checkpoint_every": 3})
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


CASES = [
    ("unknown key", ["optim.lrr=0.1"], "unknown key 'optim.lrr'"),
    ("wrong type", ["optim.lr=fast"], "optim.lr"),
    ("B not divisible", ["batch.global_batch_size=30"], "not divisible"),
    ("zero micro batch", ["batch.micro_batch_size=0"], "batch.micro_batch_size"),
    ("negative lr", ["optim.lr=-1"], "optim.lr"),
    ("unknown engine", ["train.engine=horovod"], "train.engine"),
    ("unknown lr rule", ["optim.lr_scaling=cubic"], "optim.lr_scaling"),
    ("dataset smaller than B with drop_last", ["data.size=10", "batch.drop_last=true"], "0 iterations"),
    ("bad module:function", ["data.name=custom", "data.factory=no_such_module:make"], "data.factory"),
    ("bad factory form", ["model.name=custom", "model.factory=nocolon"], "model.factory"),
    ("bad override form", ["optim.lr"], "key.path=value"),
    ("bad duration", ["train.checkpoint_every=soon"], "train.checkpoint_every"),
    ("non-finite lr", ["optim.lr=.nan"], "optim.lr"),
    ("adam beta out of range", ["optim.betas=[0.9, 1.5]"], "optim.betas.1"),
    ("run_dir not writable", ["run_dir=/dev/null/run"], "run_dir"),
    ("resume from missing checkpoint", ["train.resume=/nonexistent/it00000001"], "cannot be used"),
    ("deepspeed JSON inconsistent", ["train.engine=deepspeed", "train.deepspeed_config=BADJSON"], "train_batch_size"),
]


@pytest.mark.parametrize(("name", "overrides", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_catalogue(config, tmp_path, capsys, name, overrides, fragment):
    if "train.deepspeed_config=BADJSON" in overrides:
        pytest.importorskip("deepspeed")
        bad = tmp_path / "ds.json"
        bad.write_text('{"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, '
                       '"gradient_accumulation_steps": 2}')
        overrides = [o.replace("BADJSON", str(bad)) for o in overrides]
    from ddp_toolkit.cli import main

    code = main(["train", str(config), f"run_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]


def test_missing_and_unreadable_config_files(tmp_path):
    for path, fragment in ((tmp_path / "missing.yaml", "cannot read config file"),
                           (tmp_path / "broken.yaml", "not valid YAML")):
        if "broken" in path.name:
            path.write_text("train: {epochs: [\n")
        proc = run_cli("train", str(path))
        assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_checkpoint_from_another_model_shape(config, tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli("train", str(config), f"run_dir={run_dir}", "train.halt_at=3")
    assert first.returncode == 0, first.stderr
    proc = run_cli("train", str(config), f"run_dir={run_dir}", "train.resume=auto", "model.hidden=[16]")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "does not fit this model" in lines[0] or "belongs to a different run: model.hidden" in lines[0]
