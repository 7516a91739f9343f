"""A real one-node SLURM cluster for the tests in this folder, started once per session.

`slurm/cluster-start.sh` installs the Debian packages if needed (root only) and starts munged, slurmctld
and slurmd with everything under a pytest temporary directory; the cluster is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddp_toolkit.slurm import job_state

REPO = Path(__file__).resolve().parents[2]
START = REPO / "slurm" / "cluster-start.sh"
STOP = REPO / "slurm" / "cluster-stop.sh"
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "munged")


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: its directory and the variables Slurm's client commands need."""

    dir: Path
    env: dict[str, str]


def _skip_reason() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if shutil.which("bash") is None:
        return "bash not found"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the local SLURM test cluster needs root (slurmd and munged run as root)"
    if not all(shutil.which(c) for c in SLURM_COMMANDS) and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Start the cluster (or skip with the reason); stop it when the session ends."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    installed = all(shutil.which(c) for c in SLURM_COMMANDS)
    cluster_dir = tmp_path_factory.mktemp("slurm-cluster")
    proc = subprocess.run(["bash", str(START), str(cluster_dir)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["bash", str(STOP), str(cluster_dir)], capture_output=True, timeout=120)
        if not installed:  # e.g. no package mirror reachable
            pytest.skip(f"could not install Slurm: {_last_line(proc.stderr)}")
        pytest.fail(f"cluster-start.sh failed: {proc.stderr.strip()}")
    try:
        yield SlurmCluster(dir=cluster_dir, env={"SLURM_CONF": str(cluster_dir / "slurm.conf")})
    finally:
        subprocess.run(["bash", str(STOP), str(cluster_dir)], capture_output=True, timeout=120)


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SlurmCluster:
    """Point Slurm's commands at the test cluster and run in a fresh directory (the job's workdir)."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return slurm_cluster


def _wait_for(job_id: int, done: Callable[[dict[str, str]], bool], what: str,
              timeout_s: float = 45.0) -> dict[str, str]:
    """Poll `scontrol show job` until done(state) holds; fail with the last state after timeout_s."""
    deadline = time.monotonic() + timeout_s
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if done(state):
            return state
        time.sleep(0.25)
    pytest.fail(f"job {job_id}: {what} not reached after {timeout_s:.0f} s; last state "
                f"JobState={state.get('JobState')} Restarts={state.get('Restarts')} "
                f"Reason={state.get('Reason')}")


@pytest.fixture
def wait_for() -> Callable[..., dict[str, str]]:
    """`wait_for(job_id, done, what, timeout_s=45)`: the job's state once `done(state)` holds."""
    return _wait_for
