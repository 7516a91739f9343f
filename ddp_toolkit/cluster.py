"""What the runtime needs to know about a cluster job: SLURM node lists, the rendezvous port of a job and
the preemption flag file. The sbatch renderer (`slurm.py`, a tool) imports these; the runtime never imports it.
"""

from __future__ import annotations

import itertools
import re

__all__ = ["MASTER_PORT_BASE", "MASTER_PORT_SPAN", "PREEMPT_ENV", "PREEMPT_FILE_NAME", "expand_nodelist",
           "master_port_for_job"]

MASTER_PORT_BASE = 20000
"""Lowest rendezvous port; with the span, ports stay in [20000, 29999], below Linux's ephemeral
range (32768 and up), so no outgoing connection can already hold the port."""
MASTER_PORT_SPAN = 10000
PREEMPT_ENV = "DDP_TOOLKIT_PREEMPT_FILE"
"""Environment variable naming the flag file that asks the trainer to checkpoint and stop."""
PREEMPT_FILE_NAME = "PREEMPT"
"""Default name of that flag file inside run_dir."""


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside square brackets; raise on unbalanced brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in node list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in node list {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    """`01-03,7` -> ['01', '02', '03', '7']; the width of the lower bound sets the zero padding."""
    out: list[str] = []
    for item in body.split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in node list {whole!r}")
        if hi and int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list {whole!r}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list like `gpu[01-04,07],cpu5` in order, as `scontrol show hostnames` does.

    Zero padding is kept; several bracket groups in one name give their product (`a[1-2]-b[3-4]`).
    """
    hosts: list[str] = []
    for expr in _split_top_level(nodelist.strip()):
        expr = expr.strip()
        if not expr:
            raise ValueError(f"empty host name in node list {nodelist!r}")
        pieces = re.split(r"\[([^\]]*)\]", expr)  # literal, range set, literal, range set, ...
        choices = [[p] if i % 2 == 0 else _expand_range_set(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def master_port_for_job(job_id: int) -> int:
    """Rendezvous port of a job: the same on every node and after a requeue.

    Must match the `MASTER_PORT=$(( ... ))` line that `slurm.render_sbatch` writes (a test runs both).
    """
    if job_id < 0:
        raise ValueError(f"job id must be >= 0, got {job_id}")
    return MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN
