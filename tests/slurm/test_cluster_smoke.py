"""Smoke tests on the real local SLURM cluster: two nodes, submit, signal, requeue, and the rendered script's own
preemption loop (with a stub entry script standing in for the trainer)."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from ddp_toolkit.cluster import expand_nodelist
from ddp_toolkit.slurm import cancel, render_sbatch, requeue, write_and_submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]


def _state_is(*names: str):
    return lambda state: state.get("JobState") in names


def test_two_task_job_completes(slurm_env, wait_for, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=smoke
        #SBATCH --ntasks=2
        #SBATCH --output={run_dir}/slurm-%j.out
        srun bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS on $(hostname -s)"'
        """)
    job_id = write_and_submit(script, run_dir)
    state = wait_for(job_id, _state_is("COMPLETED", "FAILED", "CANCELLED"), "a final state")
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", output
    assert "task 0 of 2" in output and "task 1 of 2" in output


def test_two_node_job_runs_one_task_on_each_node(slurm_env, wait_for, tmp_path: Path) -> None:
    """cluster-start.sh --nodes 2: one slurmd per node, all on this host; every node name resolves here (a
    job's first node name is its rendezvous address)."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=two-nodes
        #SBATCH --nodes={slurm_env.nodes}
        #SBATCH --ntasks-per-node=1
        #SBATCH --output={run_dir}/slurm-%j.out
        for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
            getent hosts "$host" >/dev/null && echo "node $host resolves"
        done
        srun bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS on node $SLURMD_NODENAME"'
        """)
    job_id = write_and_submit(script, run_dir)
    state = wait_for(job_id, _state_is("COMPLETED", "FAILED", "CANCELLED"), "a final state")
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", output
    nodes = expand_nodelist(state["NodeList"])
    assert len(set(nodes)) == slurm_env.nodes == 2, state["NodeList"]
    assert sorted(re.findall(r"node (\S+) resolves", output)) == sorted(nodes), output
    tasks = dict(re.findall(r"task (\d+) of 2 on node (\S+)", output))
    assert sorted(tasks) == ["0", "1"] and sorted(tasks.values()) == sorted(nodes), output


def test_signal_then_requeue_runs_the_job_again(slurm_env, wait_for, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=requeue
        #SBATCH --output={run_dir}/slurm-%j.out
        #SBATCH --open-mode=append
        #SBATCH --requeue
        echo "run ${{SLURM_RESTART_COUNT:-0}}"
        [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && exit 0
        trap 'touch {run_dir}/got-usr1; kill $!; exit 0' USR1
        sleep 300 &
        touch {run_dir}/ready
        wait
        """)
    job_id = write_and_submit(script, run_dir)
    wait_for(job_id, lambda s: s["JobState"] == "RUNNING" and (run_dir / "ready").exists(), "RUNNING")
    cancel(job_id, "USR1")  # to the batch shell only
    state = wait_for(job_id, _state_is("COMPLETED", "FAILED", "CANCELLED"), "exit after SIGUSR1")
    assert state["JobState"] == "COMPLETED" and (run_dir / "got-usr1").exists()
    requeue(job_id)
    state = wait_for(job_id, lambda s: s["Restarts"] == "1" and s["JobState"] == "COMPLETED",
                     "second run COMPLETED")
    assert (run_dir / f"slurm-{job_id}.out").read_text().splitlines() == ["run 0", "run 1"]


STUB_TRAINER = """\
import os, sys, time
rank, restart = os.environ["RANK"], os.environ.get("SLURM_RESTART_COUNT", "0")
flag = os.environ["DDP_TOOLKIT_PREEMPT_FILE"]
print(f"rank {rank} world {os.environ['WORLD_SIZE']} restart {restart} args {' '.join(sys.argv[1:])}", flush=True)
open(f"{os.path.dirname(flag)}/started-{restart}-{rank}", "w").close()
while restart == "0" and not os.path.exists(flag):
    time.sleep(0.1)
if restart == "0" and rank == "0":  # like the trainer: say that a checkpoint was written, so a requeue is due
    with open(flag, "w") as fh:
        fh.write("checkpoint it00000001 at iteration 1")
print(f"rank {rank} stops", flush=True)
"""


def test_rendered_script_stops_and_requeues_itself(slurm_env, wait_for, tmp_path: Path) -> None:
    """Warning signal -> flag file -> the stub exits 0 -> the batch script requeues -> second run."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "train.py").write_text(STUB_TRAINER)  # the job runs in tmp_path
    run_dir = tmp_path / "run"
    script = render_sbatch(job_name="preempt", run_dir=str(run_dir), config_path="cfg.yaml",
                           overrides=["name=a b"], nproc_per_node=2, python=sys.executable)
    job_id = write_and_submit(script, run_dir)
    wait_for(job_id, lambda s: (run_dir / "started-0-0").exists() and (run_dir / "started-0-1").exists(),
             "both workers started")
    cancel(job_id, "USR1")  # what --signal=B:USR1@90 does before the time limit
    state = wait_for(job_id, lambda s: s["Restarts"] == "1" and s["JobState"] == "COMPLETED",
                     "requeued run COMPLETED")
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert state["ExitCode"] == "0:0", output
    assert "ddp_toolkit: requeueing job" in output, output
    for restart in (0, 1):
        for rank in (0, 1):
            assert f"rank {rank} world 2 restart {restart} args cfg.yaml name=a b train.resume=auto" in output
