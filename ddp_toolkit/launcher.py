"""Starting workers: the one torchrun command builder and free-port helper that the CLI, sweeps, tests and
benchmarks share.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LOOPBACK", "free_port", "torchrun_command", "train_target"]

LOOPBACK = "127.0.0.1"
ENTRY_SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "train.py"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on `host` a moment ago (the usual race applies: use it at once)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def train_target(config: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """What each worker runs: the entry script when the repository is at hand, else the installed CLI."""
    target = [str(ENTRY_SCRIPT)] if ENTRY_SCRIPT.exists() else ["-m", "ddp_toolkit.cli", "train"]
    return [*target, str(config), *overrides]


def torchrun_command(target: Sequence[str], *, nproc_per_node: int, nnodes: str | int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None, max_restarts: int = 0,
                     node_rank: int | None = None, python: str = sys.executable) -> list[str]:
    """The `python -m torch.distributed.run ...` command line that starts `target` on this node.

    Without an endpoint the c10d rendezvous is on the loopback interface at a free port.
    """
    endpoint = rdzv_endpoint or f"{LOOPBACK}:{free_port()}"
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--max-restarts={max_restarts}"]
    if rdzv_id:
        cmd.append(f"--rdzv-id={rdzv_id}")
    if endpoint.startswith((LOOPBACK, "localhost")):
        cmd.append(f"--local-addr={LOOPBACK}")
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    return cmd + list(target)
