"""A real two-node SLURM cluster for the tests in this folder, started once per session.

`slurm/cluster-start.sh DIR --nodes 2` installs the Debian packages if needed (root only) and starts munged,
slurmctld and one slurmd per node, all on this host, with everything under a pytest temporary directory; the
cluster is stopped at the end, and every daemon it started must be gone then. The training tests share one
config and one torchrun reference run (session fixtures), started in the background when first asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddp_toolkit.slurm import job_state
from tests.distributed.harness import small_config, torchrun, write_config
from tests.slurm.jobs import ITERATIONS

REPO = Path(__file__).resolve().parents[2]
START = REPO / "slurm" / "cluster-start.sh"
STOP = REPO / "slurm" / "cluster-stop.sh"
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "munged")
NODES = 2


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: its directory, its node count and the variables Slurm's commands need."""

    dir: Path
    nodes: int
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


def _daemon_pids(cluster_dir: Path) -> dict[str, int]:
    """PID file name -> PID of every daemon cluster-start.sh started in cluster_dir."""
    files = [*cluster_dir.glob("*.pid"), *cluster_dir.glob("munge/*.pid")]
    return {f.name: int(f.read_text()) for f in files if f.read_text().strip().isdigit()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Start the NODES-node cluster (or skip with the reason); stop it, and check that it stopped, at the end."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    installed = all(shutil.which(c) for c in SLURM_COMMANDS)
    cluster_dir = tmp_path_factory.mktemp("slurm-cluster")
    proc = subprocess.run(["bash", str(START), str(cluster_dir), "--nodes", str(NODES)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["bash", str(STOP), str(cluster_dir)], capture_output=True, timeout=120)
        if not installed:  # e.g. no package mirror reachable
            pytest.skip(f"could not install Slurm: {_last_line(proc.stderr)}")
        pytest.fail(f"cluster-start.sh failed: {proc.stderr.strip()}")
    daemons = _daemon_pids(cluster_dir)  # munged, slurmctld and one slurmd per node
    assert len(daemons) == 2 + NODES, f"expected {2 + NODES} PID files in {cluster_dir}, got {sorted(daemons)}"
    try:
        yield SlurmCluster(dir=cluster_dir, nodes=NODES, env={"SLURM_CONF": str(cluster_dir / "slurm.conf")})
    finally:
        subprocess.run(["bash", str(STOP), str(cluster_dir)], capture_output=True, timeout=120)
    running = {name: pid for name, pid in daemons.items() if _alive(pid)}
    assert not running, f"cluster-stop.sh left daemons running: {running}"


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


@pytest.fixture(scope="session")
def train_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One float64 run of ITERATIONS iterations, written three times with data of different speeds.

    `slow`: 0.05 s per micro-batch; `slow_until_requeued`: 0.35 s, 0.05 s once requeued; `slowest`: 1 s
    (tests/slurm/slow_data.py). Only the sleeping differs, so the three give the same numbers and share one
    reference run.
    """
    folder = tmp_path_factory.mktemp("slurm-train")
    configs = {}
    for speed in ("slow", "slow_until_requeued", "slowest"):
        raw = small_config(folder / "unused",
                           data={"name": "custom", "factory": f"tests.slurm.slow_data:{speed}_synthetic"},
                           train={"iterations": ITERATIONS, "log_every": 1},
                           optim={"lr": 0.1, "warmup": 4, "schedule": "cosine"})
        configs[speed] = write_config(raw, folder / f"{speed}.yaml")
    return configs


@pytest.fixture(scope="session")
def reference(slurm_cluster: SlurmCluster, train_configs: dict[str, Path]) -> Iterator[Callable[[], Path]]:
    """The same run through torchrun on this machine (one node, 2 workers), started in the background right
    away; calling the fixture's value waits for it and returns its run_dir."""
    config = train_configs["slow"]
    run_dir = config.parent / "torchrun"
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(torchrun, config, 2, f"run_dir={run_dir}", env={"PYTHONPATH": str(REPO)})

        def result() -> Path:
            proc = future.result()
            assert proc.returncode == 0, proc.stderr[-3000:]
            return run_dir

        yield result
