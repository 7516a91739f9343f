"""Helpers of the SLURM training tests: submit with the real CLI, wait, and compare a job with torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import REPO, final_weights, metrics

ITERATIONS = 100  # 10 epochs of 10 iterations of 2 micro-batches per worker (world size 2)
STOP_LINE = re.compile(r"stop requested \((PREEMPT file|SIGTERM)\)[^\n]*?checkpoint (it(\d+))")
"""The trainer's line when it stops early: why (flag file or signal), the checkpoint, its iteration."""


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """sbatch passes the submitting environment on: the repo importable (the data factory), one thread;
    `extra` adds variables such as the cluster's SLURM_CONF."""
    shell = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    return {**shell, **(extra or {}), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What an in-process run earlier in the session may have left in this process's environment: a user's shell
does not carry them into sbatch."""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ddp-toolkit ARGS` from the repository root, as a user would run it (`env` added to this environment)."""
    return subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", *args], cwd=REPO, env=job_env(env),
                          capture_output=True, text=True, timeout=120)


def submit(config: Path, run_dir: Path, *options: str, nodes: int = 1, nproc_per_node: int = 2,
           env: dict[str, str] | None = None) -> int:
    """`ddp-toolkit slurm submit CONFIG --nodes N --nproc-per-node P OPTIONS run_dir=RUN_DIR`; the job id."""
    proc = cli("slurm", "submit", str(config), "--nodes", str(nodes), "--gpus-per-node", "0",
               "--nproc-per-node", str(nproc_per_node), *options, f"run_dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


def finished(state: dict[str, str]) -> bool:
    return state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def finished_after_restarts(restarts: int):
    """done() for wait_for: the run after `restarts` requeues has finished (or any run failed)."""
    return lambda s: finished(s) and (int(s["Restarts"]) >= restarts or s["JobState"] != "COMPLETED")


def logged_iterations(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def job_output(run_dir: Path, job: int) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text() if path.exists() else f"(no {path.name} yet)"


def assert_in_order(text: str, events: list[str]) -> None:
    """Every event occurs in text, each after the previous one."""
    start = 0
    for event in events:
        found = text.find(event, start)
        assert found >= 0, f"{event!r} missing (in this order) from:\n{text}"
        start = found + len(event)


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Each iteration logged exactly once with the reference's numbers, and bit-identical final weights."""
    rows, expected = metrics(run_dir), metrics(reference_dir)
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    for row, ref in zip(rows, expected, strict=True):
        for key in ("iteration", "epoch", "samples_seen", "lr", "world_size", "grad_accum_steps"):
            assert row[key] == ref[key], (row["iteration"], key)
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-12, abs=0), row["iteration"]
    a, b = final_weights(run_dir), final_weights(reference_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
