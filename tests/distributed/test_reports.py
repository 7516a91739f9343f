"""Reports: wandb offline run read back with wandb's own reader, clean plain-text logs, PNG plots, and the
logged loss equal to the global-batch mean computed by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddp_toolkit.config import validate
from ddp_toolkit.data import build_data
from ddp_toolkit.models import build_model
from ddp_toolkit.sampler import GlobalBatchSampler
from tests.distributed.harness import REPO, metrics, small_config, spawn_train, torchrun, write_config

pytestmark = pytest.mark.distributed


def read_wandb_history(wandb_dir) -> list[dict]:
    """History rows of the single offline run under wandb_dir, parsed by wandb's own record reader."""
    files = list(wandb_dir.rglob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return read_wandb_file(files[0])


def read_wandb_file(path) -> list[dict]:
    """History rows of one offline run file (run-ID.wandb)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(path))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_matches_metrics_and_loss_is_global_mean(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = small_config(tmp_path / "run", batch={"micro_batch_size": 4, "global_batch_size": 16},
                       train={"iterations": 6, "log_every": 1},
                       report={"wandb": True, "wandb_project": "ddp-toolkit-test", "tags": ["ci"]})
    run_dir = spawn_train(raw, 2)
    rows = metrics(run_dir)
    history = [h for h in read_wandb_history(run_dir / "wandb") if "loss" in h]
    assert [h["_step"] for h in history] == [r["iteration"] for r in rows] == list(range(1, 7))
    assert [h["lr"] for h in history] == [r["lr"] for r in rows]
    assert [h["loss"] for h in history] == [r["loss"] for r in rows]
    assert [h["samples_seen"] for h in history] == [r["samples_seen"] for r in rows]

    # the first logged loss is the mean per-sample loss over global batch 0 at the initial weights
    cfg = validate(raw)
    train_set, _ = build_data(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, 8, 3)
    idx = torch.tensor(GlobalBatchSampler(len(train_set), 16, 16, 1, 0, seed=cfg.train.seed).global_batch(0))
    with torch.no_grad():
        expected = F.cross_entropy(model(train_set.x[idx].double()), train_set.y[idx]).item()
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-12)


def test_non_terminal_output_is_plain_text(tmp_path):
    raw = small_config(tmp_path / "run", train={"iterations": 12, "log_every": 3, "eval_every": 6})
    config = write_config(raw, tmp_path / "cfg.yaml")
    proc = torchrun(config, 2, "report.console=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "\x1b" not in out and "\r" not in out
    assert "batch plan" in out and "global batch 16 = 4 micro × 2 devices × 2 accumulation" in out
    assert "summary" in out and "allreduces per iteration" in out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 4 and "iteration 12/12" in lines[-1]
    assert all(ch.isprintable() for line in out.splitlines() for ch in line)


def test_report_writes_png_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    raw = small_config(tmp_path / "run", train={"iterations": 20, "log_every": 2, "eval_every": 10})
    spawn_train(raw, 1)
    proc = subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", "report", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    assert "samples seen" in proc.stdout
    for name in ("loss_vs_iteration.png", "loss_vs_samples.png", "lr_vs_iteration.png"):
        image = np.asarray(Image.open(tmp_path / "run" / name).convert("L"), dtype=float)
        assert image.shape == (400, 700)
        assert image.std() > 5  # not blank: axes, curve and labels
        assert (image < 128).mean() > 0.005


def test_report_on_missing_run_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
