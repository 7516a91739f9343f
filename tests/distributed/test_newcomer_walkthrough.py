"""A newcomer's first hour, scripted: in a fresh directory, plan the default config for 8 devices, read the
resolved config back, and run every shipped config for 20 iterations with one override. (The comparison with a
plain DDP script is tests/distributed/test_migration.py.) In-process through the CLI entry point, W = 1."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddp_toolkit.cli import main
from ddp_toolkit.config import load_config, validate
from tests.distributed.harness import REPO, metrics

pytestmark = pytest.mark.distributed

CONFIGS = REPO / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("sweeps", "accelerate"))


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


@pytest.fixture
def fresh_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_plan_the_default_config_for_eight_devices(fresh_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(CONFIGS / "default.yaml"), "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    for line in ("global batch 128 = 16 micro × 8 devices × 1 accumulation", "iterations per epoch", "32",
                 "96 iterations = 3 epochs = 12,288 samples", "warmup", "32 iterations = 1 epoch",
                 "0.05 at batch 32", "0.2 (linear) at batch 128", "every 32 iterations"):
        assert line in out, line
    assert main(["plan", str(CONFIGS / "default.yaml"), "--world-size", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["global_batch_size"], info["grad_accum_steps"], info["iterations_per_epoch"]) == (128, 1, 32)
    assert not list(fresh_dir.iterdir())  # planning writes nothing


def test_config_show_prints_the_resolved_config_with_descriptions(fresh_dir, capsys) -> None:
    assert main(["config", "show", str(CONFIGS / "default.yaml"), "train.iterations=20"]) == 0
    out = capsys.readouterr().out
    assert "# Stop after this many iterations" in out or "iterations: 20" in out
    shown = validate(yaml.safe_load(out))
    assert shown == load_config(CONFIGS / "default.yaml", ["train.iterations=20"])


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in RUN_CONFIGS])
def test_every_shipped_config_runs_twenty_iterations_with_one_override(fresh_dir, capsys, monkeypatch,
                                                                      path: Path) -> None:
    if path.name == "resnet_digits.yaml" and not _torchvision_imports():
        # PyPI's torchvision is a CUDA build that cannot import beside the CPU torch wheel: one line, exit 2
        assert main(["train", str(path), "train.iterations=20"]) == 2
        assert "torchvision" in capsys.readouterr().err
        return
    overrides = ["train.iterations=20"]
    if load_config(path).train.deepspeed_config:  # its JSON path is relative to the repository root: run there
        monkeypatch.chdir(REPO)
        overrides.append(f"run_dir={fresh_dir / 'run'}")
    assert main(["train", str(path), *overrides]) == 0, capsys.readouterr().err
    run_dir = fresh_dir / (Path(load_config(path).run_dir) if len(overrides) == 1 else "run")
    assert (run_dir / "final" / "model.safetensors").is_file() and json.loads((run_dir / "summary.json").read_text())
    assert metrics(run_dir)[-1]["iteration"] == 20
    assert "Traceback" not in capsys.readouterr().err
