"""Jobs that run into their real `--time` limit on the local cluster: Slurm's minimum, one minute.

How Slurm 22.05 times it (measured on this cluster): slurmctld checks time limits every 30 s. A job submitted
with `--signal B:USR1@LEAD` gets the signal at the first check that finds at most LEAD + 30 s left, and is
killed (SIGTERM to every process, SIGKILL KillWait = 10 s later) at the first check past its limit. With
`--time 1` and LEAD = 10 the warning comes 20 to 50 s after the job starts and the kill at least 30 s after
the warning. (A lead of 30 s or more would warn at the first check after the start, often before the first
iteration.) The warned job's first run trains too slowly to finish within a minute, its requeued runs fast
(tests/slurm/slow_data.py), so it needs one requeue, rarely two. Both jobs are submitted together.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.distributed.harness import metrics
from tests.slurm.jobs import (
    ITERATIONS,
    STOP_LINE,
    assert_in_order,
    assert_same_run,
    finished,
    job_output,
    submit,
)
from tests.slurm.slow_data import SECONDS_ENV, SECONDS_PER_FETCH

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(480)]

LEAD = "B:USR1@10"
CHECKPOINT_EVERY = 5


@pytest.fixture(scope="module")
def time_limited(slurm_cluster, train_configs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """name -> (job id, run_dir): `warned` (two nodes, the warning signal, 100 iterations that need over 70 s
    in the first run) and `unwarned` (one node, `--signal none`, over 200 s), submitted side by side."""
    folder = tmp_path_factory.mktemp("time-limit")
    jobs = {  # name: (config, options, nodes)
        "warned": (train_configs["slow_until_requeued"], ["--signal", LEAD], 2),
        "unwarned": (train_configs["slowest"], ["--signal", "none", f"train.checkpoint_every={CHECKPOINT_EVERY}"], 1),
    }

    def submit_job(name: str) -> int:
        config, options, nodes = jobs[name]
        return submit(config, folder / name, "--time", "1", *options, nodes=nodes, nproc_per_node=2 // nodes,
                      env=slurm_cluster.env)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return {name: (job, folder / name) for name, job in zip(jobs, pool.map(submit_job, jobs), strict=True)}


def runs_of(output: str, job: int) -> list[str]:
    """The output of each run of the job (slurm-JOB.out is appended to across requeues), in order."""
    parts = re.split(rf"(?=ddp_toolkit: job {job} restart \d+ on)", output)
    return [p for p in parts if p.startswith(f"ddp_toolkit: job {job} restart")]


def test_unwarned_job_is_killed_at_the_limit_and_not_requeued(slurm_env, wait_for, time_limited, train_configs,
                                                              reference) -> None:
    """`--signal none`: nothing warns the job. At the limit Slurm sends SIGTERM to every process and SIGKILL
    KillWait (10 s) later. The trainer takes SIGTERM as a stop request: it checkpoints after the iteration it
    is in (2 s here) and the job ends TIMEOUT, not requeued. Nothing trained is lost, but nothing restarts the
    job: submitting it again resumes from that checkpoint, bit-exact. Had the iteration plus the save taken
    longer than KillWait, the iterations since the last periodic checkpoint would have been lost."""
    job, run_dir = time_limited["unwarned"]
    state = wait_for(job, finished, "the job ended", timeout_s=240)
    output = job_output(run_dir, job)
    assert (state["JobState"], state["Reason"], state["Restarts"]) == ("TIMEOUT", "TimeLimit", "0"), output
    assert f"JOB {job} ON" in output and "DUE TO TIME LIMIT" in output, output
    assert "got SIGUSR1" not in output and "requeueing" not in output, output

    logged = len(metrics(run_dir))
    stop = STOP_LINE.search(output)
    assert stop and stop.group(1) == "SIGTERM", output
    saved = int(stop.group(3))
    assert saved == logged < ITERATIONS and logged >= CHECKPOINT_EVERY, (saved, logged)
    periodic = [CHECKPOINT_EVERY * (logged // CHECKPOINT_EVERY)] if logged % CHECKPOINT_EVERY else []
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("it*"))
    assert kept[-1] == f"it{saved:08d}" and all(f"it{i:08d}" in kept for i in periodic), kept
    assert not (run_dir / "final" / "model.safetensors").exists()

    # Submitting the same config again (its data sped up) continues from the SIGTERM checkpoint, bit-exact.
    again = submit(train_configs["slowest"], run_dir, env={SECONDS_ENV: str(SECONDS_PER_FETCH)})
    state = wait_for(again, finished, "the resubmitted job finished", timeout_s=120)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), job_output(run_dir, again)
    assert json.loads((run_dir / "plan.json").read_text())["resumed_from"] == f"it{saved:08d}"
    assert_same_run(run_dir, reference())


def test_warned_job_checkpoints_requeues_and_finishes_bit_exact(slurm_env, wait_for, time_limited, reference) -> None:
    """Each run is warned before its limit, stops after a checkpoint and requeues itself; the last one
    finishes. The result equals one uninterrupted torchrun run, each iteration once in metrics.jsonl."""
    job, run_dir = time_limited["warned"]
    final = run_dir / "final" / "model.safetensors"
    state = wait_for(job, lambda s: finished(s) and (final.exists() or s["JobState"] != "COMPLETED"),
                     "the last run finished", timeout_s=420)
    output = job_output(run_dir, job)
    assert (state["JobState"], state["ExitCode"], state["TimeLimit"]) == ("COMPLETED", "0:0", "00:01:00"), output
    assert "DUE TO TIME LIMIT" not in output, output  # never killed: every run stopped after the warning
    runs = runs_of(output, job)
    restarts = int(state["Restarts"])
    assert restarts >= 1 and len(runs) == restarts + 1, output  # 100 iterations do not fit in one run

    stopped_at = []
    for number, run in enumerate(runs[:-1]):
        stop = STOP_LINE.search(run)
        assert stop and stop.group(1) == "PREEMPT file", run
        assert_in_order(run, [f"restart {number} on", "got SIGUSR1", stop.group(0), "srun exited with 0",
                              f"requeueing job {job}"])
        stopped_at.append(int(stop.group(3)))
    assert stopped_at == sorted(set(stopped_at)) and stopped_at[-1] < ITERATIONS, stopped_at  # progress each run
    assert "srun exited with 0" in runs[-1] and "requeueing" not in runs[-1], runs[-1]
    assert json.loads((run_dir / "plan.json").read_text())["resumed_from"] == f"it{stopped_at[-1]:08d}"
    assert_same_run(run_dir, reference())
