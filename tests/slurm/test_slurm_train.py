"""Real training jobs on the local two-node SLURM cluster, submitted with `ddp-toolkit slurm submit` (real sbatch).

A job must give exactly the run torchrun gives on this machine with one node and two workers, in both launch
modes, whether it runs on one node (2 workers) or on two (1 worker each, one srun task per node, the c10d
rendezvous hosted by node 0); preempted with the warning signal, it must checkpoint, requeue itself, resume
from the checkpoint and still end bit-identical. The data set sleeps a fixed time per batch
(tests/slurm/slow_data.py) so that the signal lands mid-run.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ddp_toolkit.cluster import expand_nodelist
from ddp_toolkit.slurm import cancel
from tests.slurm.jobs import (
    ITERATIONS,
    STOP_LINE,
    assert_in_order,
    assert_same_run,
    cli,
    finished,
    finished_after_restarts,
    job_output,
    logged_iterations,
    submit,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]

SIGNAL_AFTER = 10  # iterations logged before the warning signal is sent
WORLD_SIZE = 2  # every job: 1 node × 2 workers or 2 nodes × 1 worker


def assert_ran_on(state: dict[str, str], nodes: int) -> None:
    """The job had `nodes` distinct nodes, and each node name resolves (the first is the rendezvous host)."""
    hosts = expand_nodelist(state["NodeList"])
    assert len(set(hosts)) == len(hosts) == nodes, state["NodeList"]
    for host in hosts:
        socket.getaddrinfo(host, None)


def test_both_launch_modes_on_one_and_two_nodes_match_torchrun(slurm_env, wait_for, train_configs, reference,
                                                               tmp_path: Path) -> None:
    """Four jobs side by side: torchrun mode (one srun task per node runs the launcher) and task-per-gpu mode
    (ranks from SLURM_*), each on one node with 2 workers and on two nodes with 1 worker each."""
    cases = [(mode, nodes) for nodes in (1, 2) for mode in ("torchrun", "task-per-gpu")]

    def submit_case(case: tuple[str, int]) -> int:
        mode, nodes = case
        return submit(train_configs["slow"], tmp_path / f"{mode}-{nodes}n", "--mode", mode,
                      nodes=nodes, nproc_per_node=WORLD_SIZE // nodes)

    with ThreadPoolExecutor(len(cases)) as pool:
        jobs = dict(zip(cases, pool.map(submit_case, cases), strict=True))
    reference_dir = reference()
    for (mode, nodes), job in jobs.items():
        run_dir = tmp_path / f"{mode}-{nodes}n"
        state = wait_for(job, finished, f"{mode} job on {nodes} node(s) finished", timeout_s=150)
        output = job_output(run_dir, job)
        assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", output
        assert_ran_on(state, nodes)
        assert f"#SBATCH --nodes={nodes}\n" in (run_dir / "job.sbatch").read_text()
        assert (run_dir / "job.yaml").read_text() == train_configs["slow"].read_text()
        launcher = json.loads((run_dir / "plan.json").read_text())["launcher"]
        assert launcher == f"{'torchrun' if mode == 'torchrun' else 'slurm'} (SLURM job {job})"
        assert_same_run(run_dir, reference_dir)


def test_preempted_jobs_on_one_and_two_nodes_checkpoint_requeue_and_resume_bit_exact(
        slurm_env, wait_for, train_configs, reference, tmp_path: Path) -> None:
    """Two jobs side by side (one node × 2 workers, two nodes × 1 worker), each sent the warning signal by
    hand once it has logged SIGNAL_AFTER iterations."""
    def submit_on(nodes: int) -> int:
        # the one-node job also logs to wandb (offline) and MLflow: one tracker run across the requeue
        trackers = ("report.wandb=true", "report.mlflow=true") if nodes == 1 else ()
        return submit(train_configs["slow"], tmp_path / f"{nodes}n", *trackers, nodes=nodes,
                      nproc_per_node=WORLD_SIZE // nodes, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})

    with ThreadPoolExecutor(2) as pool:
        jobs = dict(zip((1, 2), pool.map(submit_on, (1, 2)), strict=True))
    signalled: set[int] = set()

    def signal_when_due(_state: dict[str, str]) -> bool:
        """Send USR1 to each job that has logged SIGNAL_AFTER iterations; done when every job has had it."""
        for nodes, job in jobs.items():
            logged = logged_iterations(tmp_path / f"{nodes}n")
            if job not in signalled and logged >= SIGNAL_AFTER:
                assert logged < ITERATIONS, f"job {job} finished before the signal"
                cancel(job, "USR1")  # scancel --signal=USR1 --batch JOB: what --signal=B:USR1@90 does
                signalled.add(job)
        return len(signalled) == len(jobs)

    wait_for(jobs[2], signal_when_due, f"{SIGNAL_AFTER} iterations logged by both jobs", timeout_s=150)
    for nodes, job in jobs.items():
        check_preempted_run(job, tmp_path / f"{nodes}n", nodes, wait_for, reference)
    check_one_tracker_run(tmp_path / "1n")


def check_one_tracker_run(run_dir: Path) -> None:
    """The requeued job continued its wandb and MLflow runs: one run each, steps 1…ITERATIONS once each."""
    from mlflow.tracking import MlflowClient

    from tests.distributed.test_observability import wandb_runs

    ids = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, ITERATIONS + 1))
    runs = wandb_runs(run_dir / "wandb")
    assert list(runs) == [ids["wandb"]]
    assert sorted({h["_step"] for h in runs[ids["wandb"]] if "loss" in h}) == list(range(1, ITERATIONS + 1))


def check_preempted_run(job: int, run_dir: Path, nodes: int, wait_for, reference) -> None:
    """Stopped once after the warning with a checkpoint, requeued once, resumed from it, bit-exact."""
    state = wait_for(job, finished_after_restarts(1), "requeued run finished", timeout_s=150)
    output = job_output(run_dir, job)
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "1", "0:0"), output
    assert_ran_on(state, nodes)

    stop = STOP_LINE.search(output)
    assert stop and stop.group(1) == "PREEMPT file", output
    checkpoint, stopped_at = stop.group(2), int(stop.group(3))
    assert SIGNAL_AFTER <= stopped_at < ITERATIONS and (run_dir / "checkpoints" / checkpoint).is_dir()
    assert json.loads((run_dir / "plan.json").read_text())["resumed_from"] == checkpoint
    # one output file, appended to across the requeue, in this order
    assert_in_order(output, [f"job {job} restart 0 on", "got SIGUSR1", stop.group(0), "srun exited with 0",
                             f"requeueing job {job}", f"job {job} restart 1 on", "srun exited with 0"])
    assert_same_run(run_dir, reference())

    status = cli("slurm", "status", str(job))
    assert status.returncode == 0, status.stderr
    fields = dict(line.split(None, 1) for line in status.stdout.splitlines())
    assert (fields["JobState"], fields["Restarts"], fields["ExitCode"]) == ("COMPLETED", "1", "0:0")
