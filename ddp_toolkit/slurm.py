"""SLURM support: render the sbatch script (a pure function), submit it, query, requeue and cancel jobs.

How a job stops early and comes back (the contract with the trainer):

1. ``#SBATCH --signal=B:USR1@90`` makes Slurm send SIGUSR1 to the batch shell only, about 90 s before
   the time limit (up to 60 s earlier, per the sbatch manual). The shell traps it, touches the file
   named by ``$DDP_TOOLKIT_PREEMPT_FILE`` (``RUN_DIR/PREEMPT``) and remembers that a requeue is wanted.
   A SIGTERM to the shell (scancel, time limit, preemption) touches the same file, without a requeue.
2. The signal is not forwarded to the processes: torch.distributed.run would treat any signal it
   handles as a death signal (it stops its workers and SIGKILLs them 30 s later), and an unhandled
   SIGUSR1 kills it. The flag file reaches the trainer the same way under both launch modes.
3. The trainer polls the file every iteration, agrees with the other ranks (all-reduce of a stop
   flag) on the iteration to stop at, saves a checkpoint and exits 0. It also treats SIGTERM as a stop
   request (Slurm sends SIGTERM to every process at the time limit; torchrun forwards it too).
4. When ``srun`` has exited 0 after the warning signal, the batch script runs
   ``scontrol requeue $SLURM_JOB_ID`` itself: the job goes back to PENDING with the same job id, the
   output file is appended to (``--open-mode=append``) and the next run resumes (``train.resume=auto``).
   The trainer never requeues: an exit code cannot be passed through torchrun (any failing worker
   becomes exit 1), and only the batch script knows when every node has finished.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ddp_toolkit.cluster import (
    MASTER_PORT_BASE,
    MASTER_PORT_SPAN,
    PREEMPT_ENV,
    PREEMPT_FILE_NAME,
    expand_nodelist,
    master_port_for_job,
)
from ddp_toolkit.errors import RunError

__all__ = [
    "MASTER_PORT_BASE",
    "MASTER_PORT_SPAN",
    "PREEMPT_ENV",
    "PREEMPT_FILE_NAME",
    "SlurmError",
    "cancel",
    "expand_nodelist",
    "job_state",
    "master_port_for_job",
    "render_sbatch",
    "requeue",
    "torchrun_args",
    "torchrun_command",
    "write_and_submit",
]

Mode = Literal["torchrun", "task-per-gpu"]


class SlurmError(RunError):
    """A Slurm command is missing or failed; the message is one line."""


# ---------------------------------------------------------------------------------------------------
# Rendering


def _parse_signal(spec: str) -> tuple[str, str]:
    """`B:USR1@90` -> (`B:USR1@90`, `USR1`): the --signal value and the name the shell traps."""
    match = re.fullmatch(r"(?:([RB]{1,2}):)?(?:SIG)?([A-Z][A-Z0-9]*|\d+)(?:@\d+)?", spec, flags=re.I)
    if not match or "B" not in (match.group(1) or ""):
        raise ValueError(
            f"signal {spec!r} must look like 'B:USR1@90': the 'B:' prefix sends it to the batch shell,"
            " which turns it into the preemption flag file"
        )
    return spec, match.group(2).upper()


def _check_text(**values: object) -> None:
    """Reject values that would break a `#SBATCH` line or the script."""
    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, str) and ("\n" in item or "\r" in item):
                raise ValueError(f"{name} must not contain a line break: {item!r}")


def _check_counts(*, nodes: int, nproc_per_node: int, gpus_per_node: int, mode: str) -> None:
    """Reject impossible sizes and unknown modes, naming every value."""
    if nodes < 1 or nproc_per_node < 1 or gpus_per_node < 0:
        raise ValueError(
            f"need nodes >= 1, nproc_per_node >= 1, gpus_per_node >= 0; got nodes={nodes}, "
            f"nproc_per_node={nproc_per_node}, gpus_per_node={gpus_per_node}"
        )
    if mode not in ("torchrun", "task-per-gpu"):
        raise ValueError(f"mode must be 'torchrun' or 'task-per-gpu', got {mode!r}")


def _header(
    *, job_name: str, run_dir: str, nodes: int, ntasks_per_node: int, gpus_per_node: int,
    partition: str | None, time: str | None, account: str | None, cpus_per_task: int | None,
    mem: str | None, signal: str | None, requeue: bool, extra_sbatch: Sequence[str],
) -> list[str]:
    """The `#SBATCH` lines, in a fixed order."""
    opts = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}"]
    if gpus_per_node:
        opts.append(f"--gpus-per-node={gpus_per_node}")
    optional = {"cpus-per-task": cpus_per_task, "mem": mem, "partition": partition,
                "account": account, "time": time}
    opts += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    opts += [f"--output={run_dir}/slurm-%j.out", "--open-mode=append"]
    if signal is not None:
        opts.append(f"--signal={signal}")
    opts.append("--requeue" if requeue else "--no-requeue")
    opts += [opt if opt.startswith("-") else f"--{opt}" for opt in extra_sbatch]
    return [f"#SBATCH {opt}" for opt in opts]


def _preamble(run_dir: str, warn_signal: str | None, requeue: bool) -> list[str]:
    """Rendezvous address, flag file and signal traps, all in the batch shell."""
    flag = shlex.quote(f"{run_dir}/{PREEMPT_FILE_NAME}")
    lines = [
        "# Rendezvous on the first host; the port is ddp_toolkit.slurm.master_port_for_job(job id),",
        "# the same on every node and after a requeue.",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        '[ -n "$MASTER_ADDR" ] || { echo "ddp_toolkit: no first host in \'$SLURM_JOB_NODELIST\'" >&2; exit 1; }',
        "export MASTER_ADDR",
        f"export MASTER_PORT=$(( {MASTER_PORT_BASE} + SLURM_JOB_ID % {MASTER_PORT_SPAN} ))",
        "# The trainer checkpoints and exits 0 at the next iteration once this file exists.",
        f"export {PREEMPT_ENV}={flag}",
        f'rm -f "${PREEMPT_ENV}"',
        "",
        "signals_seen=0",
        *(["requeue_wanted=0"] if requeue else []),
        f'on_term() {{ signals_seen=$((signals_seen + 1)); touch "${PREEMPT_ENV}"; }}',
        "trap on_term TERM",
    ]
    if warn_signal is not None:  # a warning signal of TERM replaces the trap above
        want = "; requeue_wanted=1" if requeue else ""
        lines += [
            f"on_warning() {{ on_term{want}; echo \"ddp_toolkit: got SIG{warn_signal} at $(date -Is)\"; }}",
            f"trap on_warning {warn_signal}",
        ]
    lines += [
        "",
        'echo "ddp_toolkit: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
    ]
    return lines


def _train_args(config_path: str, overrides: Sequence[str]) -> list[str]:
    """`launch/train.py CONFIG overrides... train.resume=auto` (unless the caller set train.resume)."""
    args = ["launch/train.py", config_path, *overrides]
    if not any(o.startswith("train.resume=") for o in overrides):
        args.append("train.resume=auto")
    return args


def _escape_double_quoted(text: str) -> str:
    """Escape text for use inside "..." so that the batch shell passes it on unchanged."""
    return re.sub(r'([\\"$`])', r"\\\1", text)


def torchrun_args(*, nnodes: int | str, nproc_per_node: int, rdzv_endpoint: str, rdzv_id: int | str,
                  is_host: int | str) -> list[str]:
    """`-m torch.distributed.run ...`: the launcher arguments of one node of a multi-node job.

    The sbatch script (mode="torchrun") passes shell expressions that each node expands; the loopback
    test passes one node's values. The c10d store at rdzv_endpoint is served by the node given is_host=1,
    not guessed from host names (a guess that fails when two agents share a host).
    """
    return ["-m", "torch.distributed.run",
            "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", str(rdzv_id),
            "--rdzv-conf", f"is_host={is_host}"]


def torchrun_command(python: str, config_path: str, overrides: Sequence[str] = (), **node: int | str) -> list[str]:
    """The whole command line one node of a mode="torchrun" job runs; `node` goes to torchrun_args."""
    return [python, *torchrun_args(**node), *_train_args(config_path, overrides)]


# Each node's own values, expanded by the compute node's shell (render_sbatch escapes the `$`).
_NODE_VALUES = {"nnodes": "$SLURM_JOB_NUM_NODES", "rdzv_endpoint": "$MASTER_ADDR:$MASTER_PORT",
                "rdzv_id": "$SLURM_JOB_ID", "is_host": "$(( $SLURM_NODEID == 0 ))"}
_LINE_BREAK_BEFORE = ("-m", "--nnodes", "--rdzv-backend", "--rdzv-conf")


def _srun_torchrun(python: str, nproc_per_node: int, srun_opts: str, train_args: list[str]) -> list[str]:
    """One srun task per node runs torch's elastic launcher; node 0 hosts the rendezvous store.

    Everything inside bash -c "..." expands on the compute node: every `$` there is escaped.
    """
    exe = _escape_double_quoted(shlex.quote(python))
    launcher = torchrun_args(nproc_per_node=nproc_per_node, **_NODE_VALUES)
    rows: list[list[str]] = []
    for word in launcher:  # our own words: a `$` marks a shell expression, left unquoted on purpose
        if word in _LINE_BREAK_BEFORE:
            rows.append([])
        rows[-1].append(_escape_double_quoted(word if "$" in word else shlex.quote(word)))
    inner_args = " ".join(_escape_double_quoted(shlex.quote(a)) for a in train_args)
    return [
        "# One task per node: torch.distributed.run starts the workers of its node.",
        "# Inside the quotes every \\$ expands on the compute node, not in this shell.",
        f'srun --ntasks-per-node=1{srun_opts} --kill-on-bad-exit=1 bash -c "exec {exe} \\',
        *(f"    {' '.join(row)} \\" for row in rows),
        f'    {inner_args}" &',
    ]


def _srun_task_per_gpu(python: str, srun_opts: str, train_args: list[str]) -> list[str]:
    """One srun task per GPU runs the trainer directly; ranks come from SLURM_PROCID/LOCALID/NTASKS."""
    args = " ".join(shlex.quote(a) for a in [python, *train_args])
    return [
        "# One task per GPU: the trainer reads its rank from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS;",
        "# a launcher's rank variables inherited from the submitting shell would take precedence, so drop them.",
        "unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK TORCHELASTIC_RUN_ID",
        f"srun{srun_opts} --kill-on-bad-exit=1 {args} &",
    ]


def _wait_and_requeue(requeue: bool) -> list[str]:
    """Wait for srun (a trapped signal interrupts `wait`), requeue after a clean early stop, exit."""
    lines = [
        "srun_pid=$!",
        "# A trapped signal makes `wait` return early: wait again until srun itself has exited.",
        "while :; do",
        "    seen=$signals_seen",
        '    wait "$srun_pid"',
        "    rc=$?",
        '    [ "$seen" = "$signals_seen" ] && break',
        "done",
        'echo "ddp_toolkit: srun exited with $rc at $(date -Is)"',
    ]
    if requeue:
        lines += [
            "# Stopped early for the time limit and saved a checkpoint (the trainer wrote its iteration into the",
            "# flag file; empty means training had already finished): put the job back in the queue.",
            f'if [ "$requeue_wanted" = 1 ] && [ "$rc" = 0 ] && [ -s "${PREEMPT_ENV}" ]; then',
            '    echo "ddp_toolkit: requeueing job $SLURM_JOB_ID"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    return [*lines, 'exit "$rc"']


def render_sbatch(
    *,
    job_name: str,
    run_dir: str,
    config_path: str,
    overrides: Sequence[str] = (),
    nodes: int = 1,
    gpus_per_node: int = 0,
    nproc_per_node: int | None = None,
    partition: str | None = None,
    time: str | None = None,
    account: str | None = None,
    cpus_per_task: int | None = None,
    mem: str | None = None,
    signal: str | None = "B:USR1@90",
    requeue: bool = True,
    python: str = "python",
    extra_sbatch: Sequence[str] = (),
    mode: Mode = "torchrun",
) -> str:
    """Render the sbatch script of a training run; these keyword defaults are the single source of truth.

    mode="torchrun": one srun task per node running torch.distributed.run with nproc_per_node workers
    (default: gpus_per_node, or 1 without GPUs). mode="task-per-gpu": nproc_per_node srun tasks per node,
    each running launch/train.py itself. The job runs in the directory sbatch was called from.
    """
    _check_text(job_name=job_name, run_dir=run_dir, config_path=config_path, overrides=list(overrides),
                partition=partition, time=time, account=account, mem=mem, python=python,
                extra_sbatch=list(extra_sbatch))
    nproc = nproc_per_node if nproc_per_node is not None else (gpus_per_node or 1)
    _check_counts(nodes=nodes, nproc_per_node=nproc, gpus_per_node=gpus_per_node, mode=mode)
    signal_value, warn_signal = _parse_signal(signal) if signal is not None else (None, None)
    run_dir = run_dir.rstrip("/") or "/"
    header = _header(
        job_name=job_name, run_dir=run_dir, nodes=nodes,
        ntasks_per_node=1 if mode == "torchrun" else nproc, gpus_per_node=gpus_per_node,
        partition=partition, time=time, account=account, cpus_per_task=cpus_per_task, mem=mem,
        signal=signal_value, requeue=requeue, extra_sbatch=extra_sbatch,
    )
    train_args = _train_args(config_path, overrides)
    # Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: repeat it.
    srun_opts = f" --cpus-per-task={cpus_per_task}" if cpus_per_task is not None else ""
    launch = (_srun_torchrun(python, nproc, srun_opts, train_args) if mode == "torchrun"
              else _srun_task_per_gpu(python, srun_opts, train_args))
    lines = [
        "#!/bin/bash",
        "# Rendered by ddp_toolkit.slurm.render_sbatch: change the call, not this file.",
        *header,
        "",
        *_preamble(run_dir, warn_signal, requeue),
        "",
        *launch,
        *_wait_and_requeue(requeue),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Talking to Slurm


def _run(cmd: list[str]) -> str:
    """Run a Slurm command and return its stdout; raise SlurmError with one line on any failure."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise SlurmError(
            f"{cmd[0]} not found: run this where Slurm's client commands are installed "
            "(or start the test cluster with slurm/cluster-start.sh)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(cmd)} did not answer within 60 s") from None
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise SlurmError(f"{shlex.join(cmd)} failed with exit code {proc.returncode}: {lines[-1]}")
    return proc.stdout


def write_and_submit(script_text: str, run_dir: str | Path) -> int:
    """Write RUN_DIR/job.sbatch and submit it with `sbatch --parsable`; return the job id.

    The job's working directory is the caller's current directory (sbatch's default).
    """
    path = Path(run_dir) / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script_text)
    out = _run(["sbatch", "--parsable", str(path)]).strip()
    job_id = out.split(";")[0]  # "<id>" or "<id>;<cluster>"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch --parsable printed {out!r}, not a job id")
    return int(job_id)


def _parse_scontrol_line(line: str) -> dict[str, str]:
    """`Key=value Key2=a b Key3=...` -> dict; a value runs until the next ` Key=`."""
    starts = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/.()-]*)=", line))
    fields = {}
    for this, nxt in zip(starts, [*starts[1:], None], strict=True):
        end = nxt.start() if nxt is not None else len(line)
        fields[this.group(1)] = line[this.end():end].strip()
    return fields


def job_state(job_id: int) -> dict[str, str]:
    """All fields of `scontrol show job -o ID` as strings (JobState, Restarts, ExitCode, NodeList...).

    Slurm keeps a finished job there for MinJobAge seconds (300 by default); no slurmdbd is needed.
    """
    out = _run(["scontrol", "show", "job", "-o", str(int(job_id))]).strip()
    if not out:
        raise SlurmError(f"scontrol show job {job_id} printed nothing")
    return _parse_scontrol_line(out.splitlines()[0])


def requeue(job_id: int) -> None:
    """Put a running or finished batch job back into the queue (`scontrol requeue`), same job id."""
    _run(["scontrol", "requeue", str(int(job_id))])


def cancel(job_id: int, signal: str | None = None, *, batch: bool = True) -> None:
    """Cancel a job, or only send it `signal` (e.g. "USR1").

    With a signal and batch=True (the default) only the batch shell gets it, as with `--signal=B:...`:
    that is where the rendered script traps it. batch=False signals the job steps instead.
    """
    cmd = ["scancel"]
    if signal is not None:
        cmd.append(f"--signal={signal}")
        if batch:
            cmd.append("--batch")
    _run([*cmd, str(int(job_id))])
