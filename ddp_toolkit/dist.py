"""Who am I in the job: rank information from torchrun, accelerate, deepspeed or SLURM; process group setup.

The backend follows the device: nccl when CUDA is available, gloo on CPU. One device per process:
`cuda_device_index` refuses to put two ranks of a node on one GPU; `check_device_settings` and
`apply_numerics` check and apply the device-dependent settings (bf16, SyncBatchNorm, TF32, deterministic).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp_toolkit.cluster import expand_nodelist, master_port_for_job
from ddp_toolkit.errors import InputError

__all__ = ["DistEnv", "DeviceError", "apply_numerics", "check_device_settings", "cuda_device_index", "distributed",
           "detect_launcher", "all_reduce_sum", "watch_launcher"]

ORPHAN_GRACE_S = 30.0
"""After its launcher died, how long a worker may take to checkpoint and exit before it exits anyway."""
_WATCHED_LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "slurm")
_LAUNCHER_PID = os.getppid()  # read at import, as early as a worker can, in case the launcher dies soon after


# Step ids Slurm reserves for the batch shell, the extern and interactive steps (0xFFFFFFFA and up).
_SLURM_SPECIAL_STEP_IDS = 0xFFFFFFFA


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """A task of an `srun` job step; the batch shell and `salloc`'s shell have SLURM_PROCID but no step id."""
    step = env.get("SLURM_STEP_ID", "")
    return "SLURM_PROCID" in env and step.isdigit() and int(step) < _SLURM_SPECIAL_STEP_IDS


def detect_launcher(env: Mapping[str, str]) -> str:
    """Which launcher started this process: accelerate, deepspeed, torchrun, env, slurm or none.

    A launcher's own variables win over SLURM's: under `srun ... torchrun`, the workers are torchrun's.
    """
    if "ACCELERATE_MIXED_PRECISION" in env:
        return "accelerate"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if _in_slurm_step(env):
        return "slurm"
    return "none"


def _tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node `node` from SLURM's `2(x3),1` notation (three nodes with 2 tasks, then one with 1)."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot read tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[min(node, len(counts) - 1)]


@dataclass(frozen=True)
class DistEnv:
    """Rank information of this process; a lone process with no variables is rank 0 of world size 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"
    slurm_job_id: str | None = None
    gpus_per_task: bool = False
    """Slurm binds each task to its own GPU(s) (`srun --gpus-per-task`): every task uses its device 0."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        """Read torchrun / accelerate / deepspeed variables, else SLURM's (one task per device)."""
        env = os.environ if env is None else env
        launcher = detect_launcher(env)
        job_id = env.get("SLURM_JOB_ID")
        if launcher in ("accelerate", "deepspeed", "torchrun", "env"):
            if "RANK" not in env or "WORLD_SIZE" not in env:  # e.g. `accelerate launch` of one process
                return cls(launcher=launcher, slurm_job_id=job_id)
            world = int(env["WORLD_SIZE"])
            local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world)))
            return cls(
                rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
                local_world_size=local_world,
                node_rank=int(env.get("GROUP_RANK", env.get("CROSS_RANK", env.get("NODE_RANK", 0)))),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)), launcher=launcher, slurm_job_id=job_id,
            )
        if launcher == "slurm":
            return cls._from_slurm(env)
        return cls(slurm_job_id=job_id)

    @classmethod
    def _from_slurm(cls, env: Mapping[str, str]) -> DistEnv:
        """One srun task per device: SLURM_PROCID / LOCALID / NODEID; the step's first host is the master."""
        job_id = env.get("SLURM_JOB_ID")
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        node = int(env.get("SLURM_NODEID", 0))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", str(world)))
        nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(k)), "127.0.0.1")
        return cls(
            rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)), world_size=world,
            local_world_size=_tasks_on_node(per_node, node), node_rank=node,
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or master_port_for_job(int(job_id or 0))),
            launcher="slurm", slurm_job_id=job_id, gpus_per_task=bool(env.get("SLURM_GPUS_PER_TASK")),
        )

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    @functools.cached_property
    def device(self) -> torch.device:
        """This rank's GPU (see `cuda_device_index`), or the CPU when CUDA is not available."""
        if torch.cuda.is_available():
            return torch.device("cuda", cuda_device_index(self.local_rank, self.local_world_size,
                                                          torch.cuda.device_count(), self.gpus_per_task))
        return torch.device("cpu")

    def describe_launcher(self) -> str:
        """`torchrun`, `accelerate`, ... plus the SLURM job id when there is one."""
        text = self.launcher if self.launcher != "none" else "single process"
        return f"{text} (SLURM job {self.slurm_job_id})" if self.slurm_job_id else text


class DeviceError(InputError):
    """A device setting this machine cannot honour (GPUs per node, bf16, SyncBatchNorm); exit 2."""


def cuda_device_index(local_rank: int, local_world_size: int, device_count: int, gpus_per_task: bool = False) -> int:
    """The GPU of local rank `local_rank`: its own index when the node shows every process all its GPUs; 0 when
    Slurm gives each task its own (`--gpus-per-task`). Two ranks on one GPU is an error, not a silent modulo."""
    if gpus_per_task:
        return 0
    if local_world_size > device_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DeviceError(f"{local_world_size} processes on this node but {device_count} GPU"
                          f"{'s' if device_count != 1 else ''} visible{shown}: two ranks would share a GPU; start "
                          f"one process per GPU, or give each task its own GPU (srun --gpus-per-task=1)")
    return local_rank


def check_device_settings(device: torch.device, *, precision: str, sync_batchnorm: bool,
                          distributed: bool) -> None:
    """One line for a setting the device cannot run: bf16 before Ampere, SyncBatchNorm on CPU or with bf16."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} does not support bfloat16 "
                          f"(Ampere or newer needed); use train.precision=fp32")
    if not (sync_batchnorm and distributed):
        return
    if device.type != "cuda":
        raise DeviceError("train.sync_batchnorm=true needs CUDA: torch's SyncBatchNorm refuses CPU tensors; "
                          "set train.sync_batchnorm=false on CPU")
    if precision == "bf16":
        raise DeviceError("train.sync_batchnorm=true with train.precision=bf16 is not supported yet (not tested "
                          "on a GPU); use one or the other")


def apply_numerics(device: torch.device, *, deterministic: bool, tf32: bool | None) -> None:
    """Deterministic algorithms (cuDNN deterministic, no benchmark, no TF32, CUBLAS workspace) and the TF32
    switch on CUDA; `tf32=None` keeps torch's default. Process-wide, so called once per worker."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first handle
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        tf32 = False
    if tf32 is not None and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


@contextlib.contextmanager
def distributed(env: DistEnv, timeout_s: float = 600) -> Iterator[DistEnv]:
    """Initialise the process group when W > 1 (and set the device); tear it down only if we made it.

    While inside, a worker started by a launcher stops when that launcher dies (`watch_launcher`).
    """
    created, watch = False, watch_launcher(env)
    if env.is_distributed and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env.master_addr
        os.environ["MASTER_PORT"] = str(env.master_port)
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(env, timeout)
        dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                store=store if store is not None else _loopback_store(env, timeout),
                                device_id=env.device if env.device.type == "cuda" else None)  # NCCL bound now
        created = True
    try:
        yield env
    finally:
        if watch is not None:
            watch.set()
        if created and dist.is_initialized():
            dist.destroy_process_group()


def watch_launcher(env: DistEnv, *, poll_s: float = 1.0, grace_s: float = ORPHAN_GRACE_S) -> threading.Event | None:
    """Stop this worker when the launcher that started it (torchrun's agent, accelerate, deepspeed, srun's
    slurmstepd) dies: SIGTERM to itself, a stop request that the trainer answers with a checkpoint after
    the current iteration; exit anyway `grace_s` later. Set the returned event to end the watch; None
    when nothing is watched (no launcher, or one we do not know: its parent may be a login shell).

    A daemon thread polls the parent's pid: PR_SET_PDEATHSIG would fire when the launcher's *thread* that
    started us ends, and it is Linux only.
    """
    if env.launcher not in _WATCHED_LAUNCHERS:
        return None
    done = threading.Event()
    threading.Thread(target=_watch_parent, args=(_LAUNCHER_PID, done, poll_s, grace_s), daemon=True,
                     name="ddp_toolkit-watch-launcher").start()
    return done


def _watch_parent(parent: int, done: threading.Event, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent:
        if done.wait(poll_s):
            return
    rank = os.environ.get("RANK", "?")
    print(f"rank {rank}: the launcher (pid {parent}) is gone; stopping after this iteration", file=sys.stderr,
          flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    if not done.wait(grace_s):
        print(f"rank {rank}: still running {grace_s:g} s after the launcher died; exiting", file=sys.stderr,
              flush=True)
        os._exit(1)


def _loopback_family(addr: str) -> socket.AddressFamily | None:
    """AF_INET / AF_INET6 when `addr` is a loopback address (or `localhost`), else None."""
    if addr == "localhost":
        return socket.AF_INET
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if not ip.is_loopback:
        return None
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def _loopback_store(env: DistEnv, timeout: timedelta) -> dist.Store | None:
    """When MASTER_ADDR is a loopback address, the process-group store listening on that address only.

    torch's TCPStore server binds the wildcard address (every interface, IPv4 and IPv6) whatever host name
    it is given; only a socket the caller bound and passes as `master_listen_fd` narrows it. None (torch's
    own env:// store) for any other address.
    """
    family = _loopback_family(env.master_addr)
    if family is None:
        return None
    if env.rank != 0:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1" if env.master_addr == "localhost" else env.master_addr, env.master_port))
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise RuntimeError(f"cannot listen on {env.master_addr}:{env.master_port} for the process-group "
                           f"store: {err}") from err
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=True, timeout=timeout,
                         master_listen_fd=sock.detach())  # the store owns the socket from here on


def _attempt_store(env: DistEnv, timeout: timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart attempt, so that a restarted worker group
    never reads a rendezvous key (a peer's old address) left by the group before it; None elsewhere."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return dist.PrefixStore(f"ddp_toolkit/{run_id}/attempt{attempt}/", store)


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few scalars over ranks in float64 (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
