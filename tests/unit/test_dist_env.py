"""DistEnv.from_env: each launcher's variables → rank, local rank, world size, node rank, master address/port.

The variable sets are the ones the launchers really set (torch.distributed.run, accelerate launch, the
deepspeed launcher, srun); the SLURM ones were read from tasks of a real job.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from ddp_toolkit.dist import DistEnv, _loopback_family, _loopback_store, detect_launcher, watch_launcher
from ddp_toolkit.slurm import master_port_for_job

TORCHRUN_RANK5 = {  # node 1 of 2, 4 workers per node, as torch.distributed.run sets it
    "TORCHELASTIC_RUN_ID": "job7", "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "5", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400",
    "TORCHELASTIC_RESTART_COUNT": "0",
}
SLURM_STEP_RANK5 = {  # `srun` task 5 of 8, 4 per node, on the second of two nodes
    "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2",
}
SLURM_BATCH_SHELL = {  # the batch script itself: SLURM_PROCID and SLURM_NTASKS, but no job step
    "SLURM_JOB_ID": "1234", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "8",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2",
}
ACCELERATE = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False", "ACCELERATE_DYNAMO_BACKEND": "NO"}
DEEPSPEED_RANK3 = {  # deepspeed's launcher on node 1 of 2, 2 workers per node
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
    "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2",
}
FIELDS = ("launcher", "rank", "local_rank", "world_size", "local_world_size", "node_rank", "master_addr",
          "master_port", "slurm_job_id")

CASES = {
    "no launcher": ({}, ("none", 0, 0, 1, 1, 0, "127.0.0.1", 29500, None)),
    "torchrun": (TORCHRUN_RANK5, ("torchrun", 5, 1, 8, 4, 1, "gpu01", 29400, None)),
    "torchrun inside srun (sbatch default mode)": (
        {**SLURM_STEP_RANK5, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", **TORCHRUN_RANK5},
        ("torchrun", 5, 1, 8, 4, 1, "gpu01", 29400, "1234")),
    "accelerate, several processes (through torchrun)": (
        {**ACCELERATE, **TORCHRUN_RANK5}, ("accelerate", 5, 1, 8, 4, 1, "gpu01", 29400, None)),
    "accelerate, one process (no RANK, no WORLD_SIZE)": (
        ACCELERATE, ("accelerate", 0, 0, 1, 1, 0, "127.0.0.1", 29500, None)),
    "deepspeed": (DEEPSPEED_RANK3, ("deepspeed", 3, 1, 4, 2, 1, "10.0.0.1", 29500, None)),
    "RANK and WORLD_SIZE only": (
        {"RANK": "1", "WORLD_SIZE": "2"}, ("env", 1, 0, 2, 2, 0, "127.0.0.1", 29500, None)),
    "srun task per device, master from the node list": (
        SLURM_STEP_RANK5, ("slurm", 5, 1, 8, 4, 1, "gpu01", master_port_for_job(1234), "1234")),
    "srun task per device, MASTER_ADDR/PORT from the batch script": (
        {**SLURM_STEP_RANK5, "MASTER_ADDR": "gpu02", "MASTER_PORT": "21234"},
        ("slurm", 5, 1, 8, 4, 1, "gpu02", 21234, "1234")),
    "srun step with uneven tasks per node": (
        {**SLURM_STEP_RANK5, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_NTASKS": "7",
         "SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "3(x2),1", "SLURM_STEP_NODELIST": "n[1-3]"},
        ("slurm", 6, 0, 7, 1, 2, "n1", master_port_for_job(1234), "1234")),
    "srun step with only the basic variables": (
        {"SLURM_STEP_ID": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77",
         "SLURM_JOB_NODELIST": "cpu7"}, ("slurm", 1, 0, 2, 2, 0, "cpu7", master_port_for_job(77), "77")),
    "the batch shell is not a worker": (SLURM_BATCH_SHELL, ("none", 0, 0, 1, 1, 0, "127.0.0.1", 29500, "1234")),
    "salloc's shell is not a worker": (
        {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a[1-2]"},
        ("none", 0, 0, 1, 1, 0, "127.0.0.1", 29500, "9")),
    "the batch step's reserved id is not a step": (
        {**SLURM_BATCH_SHELL, "SLURM_STEP_ID": str(0xFFFFFFFB)},
        ("none", 0, 0, 1, 1, 0, "127.0.0.1", 29500, "1234")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_from_env(name: str) -> None:
    env, expected = CASES[name]
    got = DistEnv.from_env(env)
    assert tuple(getattr(got, f) for f in FIELDS) == expected
    assert detect_launcher(env) == expected[0]


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION", "CROSS_RANK", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    env = DistEnv.from_env()
    assert (env.rank, env.world_size, env.launcher) == (1, 3, "env")


@pytest.mark.parametrize(("env", "text"), [
    (DistEnv(), "single process"),
    (DistEnv(launcher="torchrun", slurm_job_id="12"), "torchrun (SLURM job 12)"),
    (DistEnv.from_env(SLURM_STEP_RANK5), "slurm (SLURM job 1234)"),
])
def test_describe_launcher(env: DistEnv, text: str) -> None:
    assert env.describe_launcher() == text


def test_bad_tasks_per_node_is_one_line() -> None:
    with pytest.raises(ValueError, match="tasks per node"):
        DistEnv.from_env({**SLURM_STEP_RANK5, "SLURM_STEP_TASKS_PER_NODE": "4(y2)"})


@pytest.mark.parametrize(("launcher", "watched"), [
    ("torchrun", True), ("accelerate", True), ("deepspeed", True), ("slurm", True),
    ("none", False), ("env", False), ("test", False)])
def test_only_a_known_launcher_is_watched(launcher: str, watched: bool) -> None:
    """A process with no launcher (or an unknown one) may be a child of a login shell: never stopped."""
    watch = watch_launcher(DistEnv(launcher=launcher), poll_s=60)
    assert (watch is not None) == watched
    if watch is not None:
        watch.set()  # ends the watching thread


@pytest.mark.parametrize(("addr", "family"), [
    ("127.0.0.1", socket.AF_INET), ("127.0.0.2", socket.AF_INET), ("localhost", socket.AF_INET),
    ("::1", socket.AF_INET6), ("10.0.0.1", None), ("gpu01", None), ("0.0.0.0", None)])
def test_loopback_family(addr: str, family: socket.AddressFamily | None) -> None:
    assert _loopback_family(addr) == family


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_store_of_a_loopback_master_listens_on_loopback_only(addr: str) -> None:
    """torch's own TCPStore server binds every interface; the one `distributed()` makes binds MASTER_ADDR."""
    psutil = pytest.importorskip("psutil")
    family = socket.AF_INET if ":" not in addr else socket.AF_INET6
    try:
        with socket.socket(family) as probe:
            probe.bind((addr, 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip(f"no {addr} here")
    env = DistEnv(rank=0, world_size=1, master_addr=addr, master_port=port, launcher="test")
    store = _loopback_store(env, timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    listening = [c.laddr for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [a.ip for a in listening] == [addr]
    assert _loopback_store(DistEnv(master_addr="10.0.0.1"), timedelta(seconds=1)) is None
