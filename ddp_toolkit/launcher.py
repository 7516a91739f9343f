"""Starting workers: the one torchrun command builder and free-port helper that the CLI, sweeps, tests and
benchmarks share, and `launch`, which runs torchrun and looks after it.

What `launch` adds to torchrun:

- Stop signals. SIGTERM, SIGINT (Ctrl-C) or SIGHUP to `launch` touch the preemption flag file; the workers
  checkpoint after the current iteration and exit 0, and `launch` exits 128 + the signal's number (143 for
  SIGTERM, 130 for SIGINT). torchrun itself treats these signals as death signals: it sends them on to the
  workers and SIGKILLs them 30 s later, and SIGINT is no stop request to the trainer. A second signal
  sends SIGTERM to the agent; a third SIGKILLs it.
- A dead agent. Workers watch their parent (`dist.watch_launcher`); on Linux `launch` also adopts them
  (a child subreaper) and waits until they are gone, then exits 128 + the agent's signal with one line.
- A single node meets without any TCP socket on a non-loopback address: torch's TCPStore server always binds
  the wildcard address, so the rendezvous uses a file store in a private temporary directory (the agent
  listens on nothing), and the workers' process-group store (dist.py) and gloo listen on the loopback
  interface. NCCL's own bootstrap socket (GPU runs) is not covered: set NCCL_SOCKET_IFNAME for that.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ddp_toolkit.cluster import PREEMPT_ENV, PREEMPT_FILE_NAME
from ddp_toolkit.errors import RunError

__all__ = ["LOOPBACK", "AgentDied", "agent_env", "free_port", "launch", "torchrun_command", "train_target"]

LOOPBACK = "127.0.0.1"
ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "train.py"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
STOP_TIMEOUT_S = 300.0
"""After a stop request, how long the workers get to checkpoint before the agent is told to stop them."""
ORPHAN_WAIT_S = 40.0
"""After the agent died, how long its workers get to stop on their own (dist.ORPHAN_GRACE_S and a margin)."""
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


class AgentDied(RunError):
    """The torchrun agent was killed by a signal; the exit code is 128 + that signal, as a shell reports it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (the usual race applies: use it at once)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def train_target(config: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """What each worker runs: a user's own `.py` script with its arguments (as torchrun runs it); for a YAML
    config, the entry script when the repository is at hand, else the installed CLI."""
    if str(config).endswith(".py"):
        return [str(config), *overrides]
    target = [str(ENTRY_SCRIPT)] if ENTRY_SCRIPT.exists() else ["-m", "ddp_toolkit.cli", "train"]
    return [*target, str(config), *overrides]


def torchrun_command(target: Sequence[str], *, nproc_per_node: int, nnodes: str | int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None, max_restarts: int = 0,
                     node_rank: int | None = None, python: str = sys.executable,
                     rdzv_dir: str | Path | None = None) -> list[str]:
    """The `python -m torch.distributed.run ...` command line that starts `target` on this node.

    One node without an endpoint: with `rdzv_dir`, the rendezvous is a file store in that directory (no
    socket; run the agent with `agent_env(..., single_node=True)`); without it, a c10d TCPStore at a free
    loopback port, which torch binds on every interface all the same.
    """
    if rdzv_dir is not None and rdzv_endpoint is None and str(nnodes) == "1":
        rdzv = [f"--rdzv-endpoint={Path(rdzv_dir) / 'rendezvous'}", "--rdzv-conf=store_type=file"]
        endpoint = LOOPBACK
    else:
        endpoint = rdzv_endpoint or f"{LOOPBACK}:{free_port()}"
        rdzv = [f"--rdzv-endpoint={endpoint}"]
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}",
           "--rdzv-backend=c10d", *rdzv, f"--max-restarts={max_restarts}"]
    if rdzv_id:
        cmd.append(f"--rdzv-id={rdzv_id}")
    if endpoint.startswith((LOOPBACK, "localhost")):
        cmd.append(f"--local-addr={LOOPBACK}")  # MASTER_ADDR of the workers: their store binds it (dist.py)
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    return cmd + list(target)


def agent_env(base: Mapping[str, str], run_dir: str | Path, *, single_node: bool) -> dict[str, str]:
    """The agent's environment: one thread per worker, the preemption flag file, and on one node the
    variables that keep the stores and gloo on the loopback interface (values already set are kept)."""
    env = dict(base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault(PREEMPT_ENV, str(Path(run_dir).absolute() / PREEMPT_FILE_NAME))
    if single_node:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # no agent-hosted TCPStore for the workers
        loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
        if loopback:
            env.setdefault("GLOO_SOCKET_IFNAME", loopback)  # gloo binds the host name's address otherwise
    return env


def launch(target: Sequence[str], *, run_dir: str | Path, nproc_per_node: int, nnodes: str | int = 1,
           rdzv_endpoint: str | None = None, rdzv_id: str | None = None, max_restarts: int = 0,
           node_rank: int | None = None, stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run torchrun for `target` on this node and look after it (see the module docstring); the exit code.

    0: the run finished. 128 + N: stopped by signal N, after the workers' checkpoint when the flag file says
    so. Otherwise the agent's own code (1 when a worker failed); AgentDied when the agent was killed.
    """
    single_node = rdzv_endpoint is None and str(nnodes) == "1"
    env = agent_env(os.environ, run_dir, single_node=single_node)
    flag = Path(env[PREEMPT_ENV])
    if PREEMPT_ENV not in os.environ:  # ours: a flag left by an earlier stop would stop this run at once
        flag.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="ddp_toolkit-rdzv-") as rdzv_dir:  # mode 0700: this user only
        cmd = torchrun_command(target, nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                               rdzv_id=rdzv_id, max_restarts=max_restarts, node_rank=node_rank, rdzv_dir=rdzv_dir)
        rc, stop_signal, killed = _supervise(cmd, env, flag, stop_timeout_s)
    return _outcome(rc, stop_signal, killed, flag)


def _supervise(cmd: list[str], env: dict[str, str], flag: Path,
               stop_timeout_s: float) -> tuple[int, int | None, int]:
    """Run the agent until it exits, acting on stop signals; then wait for workers it left behind.

    Returns the agent's return code, the first stop signal (None without one) and how many left-behind
    workers had to be killed.
    """
    seen: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum)) for sig in STOP_SIGNALS}
    try:
        subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        before = set(_children())
        # its own session: Ctrl-C reaches only this process, which asks for a checkpoint instead
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_agent_preexec)
        acted, deadline = 0, float("inf")
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
            for signum in seen[acted:]:
                acted += 1
                deadline = _escalate(proc, flag, signum, acted, stop_timeout_s)
            if time.monotonic() > deadline:
                print(f"ddp-toolkit launch: no clean stop within {stop_timeout_s:g} s; stopping the agent",
                      file=sys.stderr, flush=True)
                proc.terminate()
                deadline = float("inf")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    killed = _reap_orphans(before | {proc.pid}, ORPHAN_WAIT_S) if subreaper else 0
    return proc.returncode, (seen[0] if seen else None), killed


def _escalate(proc: subprocess.Popen, flag: Path, signum: int, count: int, stop_timeout_s: float) -> float:
    """The `count`-th stop signal: touch the flag file, then SIGTERM, then SIGKILL the agent; returns when
    to stop the agent if the workers have not stopped by then."""
    name = signal.Signals(signum).name
    if count == 1:
        try:
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.touch()
        except OSError as err:
            print(f"ddp-toolkit launch: {name}: cannot write {flag} ({err}); stopping the agent",
                  file=sys.stderr, flush=True)
            proc.terminate()
            return float("inf")
        print(f"ddp-toolkit launch: {name}: the workers checkpoint after this iteration and stop "
              f"(send it again to stop the agent at once)", file=sys.stderr, flush=True)
        return time.monotonic() + stop_timeout_s
    if count == 2:
        print(f"ddp-toolkit launch: {name} again: stopping the agent (SIGTERM)", file=sys.stderr, flush=True)
        proc.terminate()
    else:
        proc.kill()
    return float("inf")


def _outcome(rc: int, stop_signal: int | None, killed: int, flag: Path) -> int:
    """The exit code of `launch`, with one line on stderr when the run did not simply finish or fail."""
    saved = _acknowledged(flag)  # e.g. "checkpoint it00000292 at iteration 292"
    workers = f"the workers saved {saved}" if saved else "the workers saved no checkpoint"
    if killed:
        workers += f"; {killed} worker(s) still running {ORPHAN_WAIT_S:g} s later were killed"
    if stop_signal is not None:
        if rc == 0 and not saved:  # the request came too late: the run had finished
            return 0
        print(f"ddp-toolkit launch: stopped on {signal.Signals(stop_signal).name}: {workers}; run the same "
              "command with train.resume=auto to continue", file=sys.stderr, flush=True)
        return 128 + stop_signal
    if rc < 0:
        raise AgentDied(f"the torchrun agent was killed by {signal.Signals(-rc).name}; {workers}", -rc)
    return rc


def _acknowledged(flag: Path) -> str:
    """What the trainer wrote into the flag file after its stop checkpoint ('' when nothing)."""
    with contextlib.suppress(OSError):
        return flag.read_text().strip()
    return ""


def _prctl(option: int, value: int) -> bool:
    """Linux prctl(option, value); False where it does not exist or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _agent_preexec() -> None:
    """In the agent before exec: SIGTERM when `launch` dies, so that it stops its workers (Linux)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _children() -> list[int]:
    """Processes whose parent is this one (Linux /proc; empty elsewhere)."""
    me, found = os.getpid(), []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(entry.path, "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4, after the command in brackets
                    found.append(int(entry.name))
    return found


def _reap_orphans(known: set[int], timeout_s: float) -> int:
    """Wait until the workers a dead agent left to this subreaper have exited; SIGKILL those still running
    after `timeout_s`. Returns how many were killed."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = [pid for pid in _children() if pid not in known and not _reaped(pid)]
        if not running:
            return 0
        if time.monotonic() > deadline:
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return len(running)
        time.sleep(0.1)


def _reaped(pid: int) -> bool:
    """Reap `pid` if it has exited; True when it is gone."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True
