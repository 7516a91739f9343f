"""Trackers and reports on real runs: TensorBoard, MLflow and wandb read back with their own readers hold the
values of metrics.jsonl; a halted and resumed run stays one tracker run with continuous steps; the report
overlays several runs into PNGs and one self-contained HTML page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch.multiprocessing as mp

from tests.distributed.harness import REPO, free_port, metrics, small_config, spawn_train
from tests.distributed.test_reports import read_wandb_file

pytestmark = pytest.mark.distributed


def wandb_runs(wandb_dir) -> dict[str, list[dict]]:
    """{run id: history rows of all its offline segments, in order}: one id per tracker run."""
    runs: dict[str, list[dict]] = {}
    for segment in sorted(wandb_dir.glob("offline-run-*")):  # offline-run-TIME-ID/run-ID.wandb
        run_id = segment.name.rsplit("-", 1)[1]
        runs.setdefault(run_id, []).extend(read_wandb_file(segment / f"run-{run_id}.wandb"))
    return runs


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _halt_then_resume(rank: int, world_size: int, ports: tuple[int, int], raw: dict) -> None:
    """Train `raw` until train.halt_at, then again with train.resume=auto, in the same spawned processes."""
    import torch

    from ddp_toolkit.config import validate
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import train_from_config

    torch.set_num_threads(1)
    for port, resume in zip(ports, ("never", "auto"), strict=True):
        env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                      master_port=port, launcher="test")
        train_from_config(validate({**raw, "train": {**raw["train"], "resume": resume}}), env=env)


def test_trackers_hold_the_metrics_and_a_resumed_run_stays_one_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = small_config(tmp_path / "run", train={"iterations": 6, "log_every": 1, "halt_at": 3, "eval_every": 6},
                       report={"wandb": True, "tensorboard": True, "mlflow": True, "run_name": "obs"})
    mp.spawn(_halt_then_resume, args=(2, (free_port(), free_port()), raw), nprocs=2, join=True)
    run_dir = tmp_path / "run"
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}

    # TensorBoard: every row's numbers at step = iteration (float32 in event files); loss also by samples seen
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for key in ("loss", "lr", "samples_seen", "grad_norm", "flops_per_second", "compute_seconds"):
        assert [s for s, _ in scalars[key]] == list(range(1, 7)), key
        np.testing.assert_allclose([v for _, v in scalars[key]], [r[key] for r in rows], rtol=1e-6)
    assert [s for s, _ in scalars["eval_loss"]] == [6]
    by_samples = tensorboard_scalars(run_dir / "tensorboard" / "by_samples")["loss_vs_samples"]
    assert [s for s, _ in by_samples] == [r["samples_seen"] for r in rows]

    # MLflow: one run in the local store, the same values (float64), the plan as parameters, the summary
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    for key in ("loss", "lr", "samples_seen", "data_seconds", "peak_memory_mib"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(r["iteration"], r[key]) for r in rows], key
    assert run.data.params["plan.global_batch_size"] == "16" and run.data.params["config.optim.lr"] == "0.2"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary.final_loss"] == summary["final_loss"] == rows[-1]["loss"]

    # wandb: one run id across the two segments (offline runs resume into new folders), steps continuous
    runs = wandb_runs(run_dir / "wandb")
    assert list(runs) == [ids["wandb"]]
    history = [h for h in runs[ids["wandb"]] if "loss" in h]
    assert [h["_step"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == [r["loss"] for r in rows]

    # throughput, time breakdown and memory in every row; no MFU on CPU without a peak
    for r in rows:
        assert r["flops_per_second"] > 0 and r["flops_per_iteration"] > 0 and "mfu" not in r
        assert r["data_seconds"] >= 0 and r["compute_seconds"] > 0 and r["optimizer_seconds"] > 0
        assert r["iteration_seconds"] >= r["compute_seconds"] and r["peak_memory_mib"] > 10


def _tiny_run(run_dir, batch: int, rule: str, lr: float):
    raw = small_config(run_dir, batch={"micro_batch_size": 4, "global_batch_size": batch},
                       optim={"name": "sgd", "lr": lr, "momentum": 0.9, "lr_scaling": rule, "base_batch_size": 8},
                       train={"samples": 256, "log_every": 2})
    return spawn_train(raw, 1)


def test_report_overlays_three_runs_into_pngs_and_one_html_page(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    runs = [_tiny_run(tmp_path / name, batch, rule, 0.1)
            for name, batch, rule in (("b8", 8, "none"), ("b16", 16, "linear"), ("b32", 32, "sqrt"))]
    proc = subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", "report", *map(str, runs), "--html"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "report"
    names = ("loss_vs_iteration.png", "loss_vs_samples.png", "lr_vs_iteration.png", "throughput_vs_iteration.png")
    for name in names:
        image = np.asarray(Image.open(out / name).convert("RGB"), dtype=float)
        assert image.shape == (400, 700, 3)
        colours = {tuple(c) for c in image.reshape(-1, 3)[::7].astype(int)}
        assert len(colours) > 20  # three coloured lines, legend, axes and text
    page = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(names)
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing to fetch
    for label in ("B 8 · none", "B 16 · linear", "B 32 · sqrt"):
        assert label in page
    assert "final loss" in page and "global batch size" in page
