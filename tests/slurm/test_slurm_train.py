"""Real training jobs on the local SLURM cluster, submitted with `ddp-toolkit slurm submit` (real sbatch).

A job must give exactly the run torchrun gives on this machine, in both launch modes; preempted with the
warning signal, it must checkpoint, requeue itself, resume from the checkpoint and still end bit-identical.
The data set sleeps a fixed time per batch (tests/slurm/slow_data.py) so that the signal lands mid-run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ddp_toolkit.slurm import cancel
from tests.distributed.harness import REPO, final_weights, metrics, small_config, torchrun, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]

ITERATIONS = 100  # 10 epochs of 10 iterations; at least 0.05 s each (slow_data.SECONDS_PER_FETCH)
SIGNAL_AFTER = 10  # iterations logged before the warning signal is sent


def job_env() -> dict[str, str]:
    """sbatch passes the submitting environment on: the repo importable (the data factory), one thread."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    """`ddp-toolkit ARGS` from the repository root, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", *args], cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=120)


def submit(config: Path, run_dir: Path, *options: str) -> int:
    proc = cli("slurm", "submit", str(config), "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
               *options, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip())


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-train")
    raw = small_config(folder / "unused", data={"name": "custom", "factory": "tests.slurm.slow_data:slow_synthetic"},
                       train={"iterations": ITERATIONS, "log_every": 1},
                       optim={"lr": 0.1, "warmup": 4, "schedule": "cosine"})
    return write_config(raw, folder / "cfg.yaml")


@pytest.fixture(scope="module")
def reference(slurm_cluster, config: Path):
    """The same run through torchrun on this machine (2 workers), started in the background right away."""
    run_dir = config.parent / "torchrun"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(torchrun, config, 2, f"run_dir={run_dir}", env={"PYTHONPATH": str(REPO)})

        def result() -> Path:
            proc = future.result()
            assert proc.returncode == 0, proc.stderr[-3000:]
            return run_dir

        yield result


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    rows, expected = metrics(run_dir), metrics(reference_dir)
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    for row, ref in zip(rows, expected, strict=True):
        for key in ("iteration", "epoch", "samples_seen", "lr", "world_size", "grad_accum_steps"):
            assert row[key] == ref[key], (row["iteration"], key)
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-12, abs=0), row["iteration"]
    a, b = final_weights(run_dir), final_weights(reference_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical


def finished(state: dict[str, str]) -> bool:
    return state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def logged_iterations(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_both_launch_modes_match_torchrun(slurm_env, wait_for, config, reference, tmp_path: Path) -> None:
    """torchrun mode (one srun task runs the launcher) and task-per-gpu mode (ranks from SLURM_*), side by side."""
    modes = ("torchrun", "task-per-gpu")
    with ThreadPoolExecutor(len(modes)) as pool:
        jobs = dict(zip(modes, pool.map(lambda m: submit(config, tmp_path / m, "--mode", m), modes), strict=True))
    reference_dir = reference()
    for mode, job in jobs.items():
        run_dir = tmp_path / mode
        state = wait_for(job, finished, f"{mode} job finished", timeout_s=120)
        output = (run_dir / f"slurm-{job}.out").read_text()
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", output
        assert (run_dir / "job.sbatch").exists() and (run_dir / "job.yaml").read_text() == config.read_text()
        launcher = json.loads((run_dir / "plan.json").read_text())["launcher"]
        assert launcher == f"{'torchrun' if mode == 'torchrun' else 'slurm'} (SLURM job {job})"
        assert_same_run(run_dir, reference_dir)


def test_preempted_job_checkpoints_requeues_and_resumes_bit_exact(slurm_env, wait_for, config, reference,
                                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = submit(config, run_dir)
    state = wait_for(job, lambda s: finished(s) or logged_iterations(run_dir) >= SIGNAL_AFTER,
                     f"{SIGNAL_AFTER} iterations logged", timeout_s=90)
    assert state["JobState"] == "RUNNING", (run_dir / f"slurm-{job}.out").read_text()
    cancel(job, "USR1")  # scancel --signal=USR1 --batch JOB: what --signal=B:USR1@90 does before the time limit
    state = wait_for(job, lambda s: finished(s) and (s["Restarts"] == "1" or s["JobState"] != "COMPLETED"),
                     "requeued run finished", timeout_s=120)
    output = (run_dir / f"slurm-{job}.out").read_text()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), output

    stop = re.search(r"stop requested \(PREEMPT file\): checkpoint (it\d+) written at iteration (\d+)", output)
    assert stop, output
    checkpoint, stopped_at = stop.group(1), int(stop.group(2))
    assert SIGNAL_AFTER <= stopped_at < ITERATIONS and (run_dir / "checkpoints" / checkpoint).is_dir()
    assert json.loads((run_dir / "plan.json").read_text())["resumed_from"] == checkpoint
    # one output file, appended to across the requeue, in this order
    events = [f"job {job} restart 0 on", "got SIGUSR1", stop.group(0), "srun exited with 0",
              f"requeueing job {job}", f"job {job} restart 1 on", "srun exited with 0"]
    start = 0
    for event in events:
        found = output.find(event, start)
        assert found >= 0, f"{event!r} missing (in this order) from:\n{output}"
        start = found + len(event)
    assert_same_run(run_dir, reference())

    status = cli("slurm", "status", str(job))
    assert status.returncode == 0, status.stderr
    fields = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", "1", "0:0")
