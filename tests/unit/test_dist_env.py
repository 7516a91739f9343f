"""DistEnv.from_env: each launcher's variables → rank, local rank, world size, node rank, master address/port.

The variable sets are the ones the launchers really set (torch.distributed.run, accelerate launch, the
deepspeed launcher, srun); the SLURM ones were read from tasks of a real job.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

import pytest
import torch

from ddp_toolkit.dist import (
    DeviceError,
    DistEnv,
    _loopback_family,
    _loopback_store,
    apply_numerics,
    check_device_settings,
    cuda_device_index,
    detect_launcher,
    watch_launcher,
)
from ddp_toolkit.rundir import RunDirNotShared, check_shared
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


# ---- one device per process, device settings (#22) ---------------------------------------------------------------
def test_cuda_device_index_one_gpu_per_local_rank():
    assert [cuda_device_index(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert cuda_device_index(1, 2, 8) == 1  # more GPUs than processes: each takes its own index


def test_two_ranks_on_one_gpu_is_one_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError, match=r"4 processes on this node but 2 GPUs visible \(CUDA_VISIBLE_DEVICES=0,1\)"):
        cuda_device_index(3, 4, 2)


def test_gpus_per_task_binding_uses_device_0():
    env = DistEnv.from_env({**SLURM_STEP_RANK5, "SLURM_GPUS_PER_TASK": "1"})
    assert env.gpus_per_task and cuda_device_index(env.local_rank, env.local_world_size, 1, env.gpus_per_task) == 0
    assert not DistEnv.from_env(SLURM_STEP_RANK5).gpus_per_task


def test_device_settings_refused_in_one_line(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    check_device_settings(cpu, precision="bf16", sync_batchnorm=True, distributed=False)  # W = 1: no SyncBN
    with pytest.raises(DeviceError, match="needs CUDA"):
        check_device_settings(cpu, precision="fp32", sync_batchnorm=True, distributed=True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(DeviceError, match="Tesla V100 does not support bfloat16"):
        check_device_settings(cuda, precision="bf16", sync_batchnorm=False, distributed=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(DeviceError, match="sync_batchnorm=true with train.precision=bf16"):
        check_device_settings(cuda, precision="bf16", sync_batchnorm=True, distributed=True)
    check_device_settings(cuda, precision="fp32", sync_batchnorm=True, distributed=True)


def test_deterministic_mode(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        apply_numerics(torch.device("cpu"), deterministic=True, tf32=None)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def _fake_group(world: int):
    """reduce_sum functions of `world` simulated ranks (threads): sum of the values every rank passed."""
    slots, barrier = [None] * world, threading.Barrier(world)

    def reduce_for(rank: int):
        def reduce_sum(values: list[float]) -> list[float]:
            slots[rank] = values
            barrier.wait()
            total = [sum(v[i] for v in slots) for i in range(len(values))]
            barrier.wait()
            return total
        return reduce_sum
    return [reduce_for(r) for r in range(world)]


def _check_shared_on_ranks(dirs: list) -> list:
    reduces, errors = _fake_group(len(dirs)), [None] * len(dirs)

    def run(rank: int) -> None:
        try:
            check_shared(dirs[rank], rank, len(dirs), reduces[rank])
        except RunDirNotShared as err:
            errors[rank] = err
    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(dirs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return errors


def test_check_shared_run_dir(tmp_path):
    assert _check_shared_on_ranks([tmp_path, tmp_path, tmp_path]) == [None, None, None]
    assert not any(tmp_path.iterdir())  # the token file is removed
    other = tmp_path / "node2"
    other.mkdir()
    errors = _check_shared_on_ranks([tmp_path, other])  # rank 1's run_dir is another file system
    assert all(e is not None for e in errors)
    assert str(errors[0]) == (f"run_dir {tmp_path} is not shared: 1 of 2 ranks cannot read the file rank 0 wrote "
                              f"there; a multi-node run needs a run_dir on a shared file system")
