"""`ddp-toolkit launch` as a tree of real processes: a stop signal, a killed agent, and the sockets a
single-node run listens on (loopback only: connections to this machine's other addresses are refused).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ddp_toolkit.cluster import PREEMPT_ENV
from ddp_toolkit.launcher import AgentDied, _outcome, agent_env, torchrun_command
from tests.distributed.harness import REPO, metrics, small_config, worker_env, write_config

pytestmark = pytest.mark.distributed

START_TIMEOUT_S = 120
WORKERS_GONE_S = 15


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`ddp-toolkit launch` of two workers on a run long enough to be stopped; stderr goes to a file."""
    run_dir = tmp_path / "run"
    config = write_config(small_config(run_dir, train={"iterations": 1_000_000, "log_every": 20, "seed": 3}),
                          tmp_path / "cfg.yaml")
    stderr = tmp_path / "launch.err"
    env = {k: v for k, v in worker_env().items() if k != PREEMPT_ENV}
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ddp_toolkit.cli", "launch", "--nproc-per-node=2",
                                 str(config)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    return proc, run_dir, stderr


def _tree(proc: subprocess.Popen, run_dir: Path) -> tuple[psutil.Process, list[psutil.Process]]:
    """The agent and its workers, once both workers train (metrics.jsonl has a row)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        agents = [p for p in psutil.Process(proc.pid).children() if "torch.distributed.run" in p.cmdline()]
        workers = agents[0].children() if agents else []
        with contextlib.suppress(OSError, ValueError):
            if len(workers) == 2 and metrics(run_dir):
                return agents[0], workers
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"launch did not start training (exit code {proc.poll()})")


def _gone(workers: list[psutil.Process], timeout_s: float) -> bool:
    _, alive = psutil.wait_procs(workers, timeout=timeout_s)
    return not alive


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by `pids`, read from /proc/net/tcp{,6}."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                addr_hex, port_hex = fields[1].split(":")
                raw = b"".join(struct.pack("<I", int(addr_hex[i:i + 8], 16)) for i in range(0, len(addr_hex), 8))
                found.append((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return found


def _own_addresses() -> list[str]:
    """This machine's own addresses on its non-loopback interfaces (IPv6 link-local with its zone)."""
    out = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(
                    a.address.split("%")[0]).is_loopback:
                out.append(f"{a.address.split('%')[0]}%{name}" if a.address.startswith("fe80") else a.address)
    return out


def _connect(address: str, port: int) -> str:
    """'refused', 'accepted', or the error a connection to (address, port) met."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(2)
        try:
            sock.connect(sockaddr)
        except ConnectionRefusedError:
            return "refused"
        except OSError as err:
            return type(err).__name__
    return "accepted"


def test_single_node_listens_on_loopback_only_and_sigterm_checkpoints(tmp_path: Path) -> None:
    proc, run_dir, stderr = _start(tmp_path)
    agent, workers = _tree(proc, run_dir)
    listening = _listening({proc.pid, agent.pid, *(w.pid for w in workers)})
    assert listening, "the workers' store and gloo listen somewhere"
    assert {ipaddress.ip_address(a).is_loopback for a, _ in listening} == {True}, listening
    assert not [p for p in agent.net_connections("tcp") if p.status == psutil.CONN_LISTEN], "the agent listens"
    outcomes = {(a, port): _connect(a, port) for a in _own_addresses() for _, port in listening}
    assert set(outcomes.values()) <= {"refused"}, f"connections to this machine's other addresses: {outcomes}"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert _gone(workers, 1) and not agent.is_running()
    saved = list((run_dir / "checkpoints").glob("it*"))
    assert saved, "no checkpoint after SIGTERM"
    last = stderr.read_text().strip().splitlines()[-1]
    assert last.startswith("ddp-toolkit launch: stopped on SIGTERM: the workers saved checkpoint it"), last
    assert "train.resume=auto" in last


def test_killed_agent_leaves_no_worker_and_one_line(tmp_path: Path) -> None:
    proc, run_dir, stderr = _start(tmp_path)
    agent, workers = _tree(proc, run_dir)
    agent.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert _gone(workers, WORKERS_GONE_S), "workers still running after their agent was killed"
    assert time.monotonic() - t0 < WORKERS_GONE_S
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    errors = [line for line in stderr.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the torchrun agent was killed by SIGKILL; the workers"), \
        errors
    assert "were killed" not in errors[0], "the workers did not stop on their own"
    assert list((run_dir / "checkpoints").glob("it*")), "the orphaned workers stop with a checkpoint"


def test_single_node_command_meets_through_a_file_without_tcp(tmp_path: Path) -> None:
    cmd = torchrun_command(["train.py", "c.yaml"], nproc_per_node=2, rdzv_dir=tmp_path)
    assert f"--rdzv-endpoint={tmp_path / 'rendezvous'}" in cmd and "--rdzv-conf=store_type=file" in cmd
    assert "--local-addr=127.0.0.1" in cmd  # the workers' MASTER_ADDR: their store listens there
    several = torchrun_command(["train.py"], nproc_per_node=2, nnodes=2, rdzv_endpoint="n1:29400", rdzv_dir=tmp_path)
    assert "--rdzv-endpoint=n1:29400" in several and "--rdzv-conf=store_type=file" not in several
    env = agent_env({}, tmp_path, single_node=True)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env[PREEMPT_ENV] == str(tmp_path / "PREEMPT")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in agent_env({}, tmp_path, single_node=False)


def test_orphan_that_ignores_sigterm_exits_after_the_grace(tmp_path: Path) -> None:
    """The worker-side watch alone (no `launch` to adopt and kill it): SIGTERM first, a hard exit after grace."""
    child = ("import signal, time\n"
             "from ddp_toolkit.dist import DistEnv, watch_launcher\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "watch_launcher(DistEnv(launcher='torchrun'), poll_s=0.1, grace_s=1)\n"
             "print('ready', flush=True)\n"
             "time.sleep(120)\n")
    log = tmp_path / "child.err"
    parent = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, "
              f"stderr=open({str(log)!r}, 'w'), text=True)\n"
              "print(p.pid, p.stdout.readline().strip(), flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=worker_env(),
                            cwd=REPO)
    pid, ready = proc.stdout.readline().split()
    orphan = psutil.Process(int(pid))
    assert ready == "ready"
    proc.kill()
    proc.wait()
    assert _gone([orphan], 10)
    assert "is gone; stopping" in log.read_text() and "exiting" in log.read_text()


@pytest.mark.parametrize(("rc", "stop", "ack", "code", "line"), [
    (0, None, "", 0, ""),
    (1, None, "", 1, ""),
    (0, signal.SIGTERM, "checkpoint it00000005 at iteration 5", 143,
     "ddp-toolkit launch: stopped on SIGTERM: the workers saved checkpoint it00000005 at iteration 5; run the same "
     "command with train.resume=auto to continue"),
    (0, signal.SIGINT, "", 0, ""),  # the request came after the last iteration: the run finished
    (1, signal.SIGINT, "", 130, "ddp-toolkit launch: stopped on SIGINT: the workers saved no checkpoint; run the "
     "same command with train.resume=auto to continue"),
])
def test_launch_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture, rc: int, stop: int | None, ack: str,
                           code: int, line: str) -> None:
    flag = tmp_path / "PREEMPT"
    if ack:
        flag.write_text(ack + "\n")
    assert _outcome(rc, stop, 0, flag) == code
    assert capsys.readouterr().err.strip() == line


def test_killed_agent_is_a_run_error_with_the_shell_code(tmp_path: Path) -> None:
    with pytest.raises(AgentDied) as err:
        _outcome(-signal.SIGKILL, None, 2, tmp_path / "PREEMPT")
    assert err.value.exit_code == 137
    assert str(err.value) == ("the torchrun agent was killed by SIGKILL; the workers saved no checkpoint; 2 worker(s) "
                              "still running 40 s later were killed")


def test_sigterm_to_a_plain_torchrun_run_checkpoints_and_stops(tmp_path: Path) -> None:
    """No wrapper: torchrun forwards SIGTERM to its workers, which checkpoint after the current iteration and
    exit 0 (torchrun itself then reports the signal); the checkpoint resumes."""
    from tests.distributed.harness import torchrun_command as plain_torchrun

    run_dir = tmp_path / "run"
    config = write_config(small_config(run_dir, train={"iterations": 1_000_000, "log_every": 1, "seed": 3}),
                          tmp_path / "cfg.yaml")
    env = {k: v for k, v in worker_env().items() if k != PREEMPT_ENV}
    with (tmp_path / "torchrun.err").open("w") as err:
        proc = subprocess.Popen(plain_torchrun(config, 2), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (run_dir / "metrics.jsonl").exists() or len(metrics(run_dir)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.err").read_text()[-3000:]
        time.sleep(0.3)
    workers = psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert _gone(workers, WORKERS_GONE_S), "a worker outlived torchrun"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("it*"))
    last = metrics(run_dir)[-1]["iteration"]
    assert saved and saved[-1] == f"it{last:08d}", (saved, last)  # stopped after the iteration it was in
    assert "stop requested (SIGTERM)" in (tmp_path / "torchrun.err").read_text()
