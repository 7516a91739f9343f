"""`ddp-toolkit plan | config | train | launch | slurm | sweep | report`.

Bad input is one line on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ddp_toolkit import sweep as _sweep
from ddp_toolkit.cli_plan import add_plan, plan_from_args
from ddp_toolkit.cli_types import Count, OneLine, UsageError
from ddp_toolkit.cli_types import IntermixedParser as _IntermixedParser
from ddp_toolkit.cli_types import Parser as _Parser
from ddp_toolkit.config_doc import add_config_parser
from ddp_toolkit.errors import ToolkitError
from ddp_toolkit.text import one_line, shown

__all__ = ["UsageError", "build_parser", "main", "plan_from_args"]

EXIT_USAGE = 2


# ---- train / launch -------------------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train in this process (or as one worker started by a launcher)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ddp_toolkit.config import load_config
    from ddp_toolkit.trainer import train_from_config

    cfg = load_config(args.config, args.overrides)
    check_run_dir(cfg.run_dir)
    train_from_config(cfg)
    return 0


def check_run_dir(run_dir: str) -> None:
    """run_dir must be creatable and writable; say so in one line before any worker starts."""
    import os
    from pathlib import Path

    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"run_dir {shown(run_dir)} cannot be created: {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"run_dir {shown(run_dir)} is not writable")


def _add_launch(sub: argparse._SubParsersAction) -> None:
    from ddp_toolkit.cli_types import Endpoint, NodeRange, Number

    p = sub.add_parser("launch", help="start workers with torch's elastic launcher (torchrun)")
    p.add_argument("--nproc-per-node", type=Count(1, 1024), default=2, help="workers on this node (default 2)")
    p.add_argument("--nnodes", type=NodeRange(), default="1", help="nodes, or MIN:MAX for elastic jobs")
    p.add_argument("--node-rank", type=Count(0, 100_000), default=None, help="this node's rank (static rendezvous)")
    p.add_argument("--rdzv-endpoint", type=Endpoint(), default=None, help="HOST:PORT of the c10d rendezvous of "
                   "several nodes (default: one node, rendezvous through a private file, stores on loopback)")
    p.add_argument("--rdzv-id", type=OneLine(256, r"[\w.\-]+", "an id of letters, digits, '_', '.' or '-'"),
                   default=None, help="job id shared by all nodes")
    p.add_argument("--max-restarts", type=Count(0, 1_000_000), default=0,
                   help="restart the worker group this many times")
    p.add_argument("--stop-timeout-s", type=Number(), default=300, help="after SIGTERM/SIGINT, seconds the "
                   "workers get to checkpoint before the agent is stopped (default 300)")
    p.epilog = ("SIGTERM or Ctrl-C: the workers checkpoint after the current iteration and stop; exit code "
                "128 + the signal (143, 130). A second signal stops the agent at once.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_launch)


def _cmd_launch(args: argparse.Namespace) -> int:
    from ddp_toolkit.config import load_config
    from ddp_toolkit.launcher import launch, train_target
    from ddp_toolkit.trainer import preflight

    options = dict(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                   rdzv_id=args.rdzv_id, max_restarts=args.max_restarts, node_rank=args.node_rank,
                   stop_timeout_s=args.stop_timeout_s)
    if args.config.endswith(".py"):  # a user's own script and its arguments, run the way torchrun runs it
        import tempfile
        from pathlib import Path

        if not Path(args.config).is_file():
            raise UsageError(f"launch: script {shown(args.config)} not found")
        with tempfile.TemporaryDirectory(prefix="ddp_toolkit-launch-") as flag_dir:  # the stop-request flag file
            return launch(train_target(args.config, args.overrides), run_dir=flag_dir, **options)
    cfg = load_config(args.config, args.overrides)  # fail fast, once, before any worker starts
    check_run_dir(cfg.run_dir)
    if args.nnodes.isdigit():
        preflight(cfg, args.nproc_per_node * int(args.nnodes))
    return launch(train_target(args.config, args.overrides), run_dir=cfg.run_dir, **options)


# ---- report -------------------------------------------------------------------------------------------
def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot runs' metrics.jsonl to PNG (several runs overlaid) and print summaries",
                       description="One run: PNGs into its run directory. Several runs: loss vs iterations and vs "
                                   "samples seen, lr and throughput overlaid, one line per run labelled by its "
                                   "global batch and lr rule, written to --out.")
    p.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directories holding metrics.jsonl")
    p.add_argument("--out", type=OneLine(4096), default=None,
                   help="where the plots go (default: the run directory for one run, else report/ in the "
                        "folder holding the runs)")
    p.add_argument("--html", action="store_true",
                   help="also write report.html: one self-contained page with the plots, plans and summaries")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ddp_toolkit.report import report_runs

    try:
        report_runs([Path(d) for d in args.run_dirs], out=None if args.out is None else Path(args.out),
                    html_page=args.html)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:  # an --out that cannot be created or written
        raise UsageError(f"report: cannot write {shown(err.filename or args.out)}: {err.strerror}") from None
    return 0


# ---- export ---------------------------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's newest valid checkpoint (sharded or not) as one safetensors "
                                      "file that loads into the plain model")
    p.add_argument("run_dir", help="a run directory (its newest valid checkpoint) or one checkpoint directory")
    p.add_argument("--out", type=OneLine(4096), default=None,
                   help="the file to write (default: RUN_DIR/export/model.safetensors)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ddp_toolkit.export import export_weights

    used, out = export_weights(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"exported {used} to {out}", file=sys.stderr)
    print(out)
    return 0


# ---- slurm ----------------------------------------------------------------------------------------------
EXIT_SLURM = 1
"""Exit code when a Slurm command fails (sbatch refused the job, unknown job id, no Slurm here)."""


_NAME = OneLine(256, r"[\w.,\-]+", "a name of letters, digits, '_', '.', ',' or '-'")
_TIME = OneLine(64, r"(?i)(\d+-)?\d+(:\d+){0,2}|unlimited|infinite", "a Slurm time like 90, 24:00:00 or 2-00:00:00")
_MEM = OneLine(32, r"\d+[KMGT]?", "memory like 480G, 64000M or 0")
_SBATCH_OPTION = OneLine(1024, r"--?[A-Za-z].*", "an sbatch option like --exclusive or --constraint=a100")
_JOB_ID = Count(1, 2**32)


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slurm", help="submit a training run to SLURM; show a job; cancel or signal it")
    jobs = p.add_subparsers(dest="slurm_command", required=True, parser_class=_IntermixedParser)
    s = jobs.add_parser("submit", help="render the sbatch script, write it to run_dir/job.sbatch and submit it")
    s.add_argument("--nodes", type=Count(1, 100_000), default=1, help="nodes (default 1)")
    s.add_argument("--gpus-per-node", type=Count(0, 1024), default=0, help="GPUs per node (default 0: CPU workers)")
    s.add_argument("--nproc-per-node", type=Count(1, 1024), help="workers per node (default: --gpus-per-node, or 1)")
    s.add_argument("--mode", choices=["torchrun", "task-per-gpu"], default="torchrun",
                   help="torchrun: one srun task per node starts the workers (default); task-per-gpu: one srun "
                        "task per worker, ranks from SLURM's variables")
    s.add_argument("--partition", type=_NAME, help="#SBATCH --partition")
    s.add_argument("--time", type=_TIME, help="time limit, e.g. 24:00:00")
    s.add_argument("--account", type=_NAME, help="#SBATCH --account")
    s.add_argument("--cpus-per-task", type=Count(1, 4096), help="CPUs per srun task (repeated for srun)")
    s.add_argument("--mem", type=_MEM, help="memory per node, e.g. 480G")
    s.add_argument("--signal", type=OneLine(64), default="B:USR1@90",
                   help="warning signal to the batch shell before the time limit: checkpoint, then requeue "
                        "(default B:USR1@90; 'none' for no warning)")
    s.add_argument("--no-requeue", action="store_true", help="checkpoint on the warning signal, but do not requeue")
    s.add_argument("--job-name", type=OneLine(200), help="default: the name of run_dir")
    s.add_argument("--python", type=OneLine(4096), default=sys.executable,
                   help="interpreter on the compute nodes (default: this one)")
    s.add_argument("--sbatch-option", type=_SBATCH_OPTION, action="append", default=[], metavar="OPTION",
                   help="one more #SBATCH option, e.g. --sbatch-option=--exclusive (repeatable)")
    s.add_argument("--no-preflight", action="store_true",
                   help="do not build the data set here to check the plan (e.g. data only on compute nodes)")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    _add_config_args(s)
    s.set_defaults(func=_cmd_slurm_submit)
    st = jobs.add_parser("status", help="a job's state, restarts, exit code and nodes (scontrol show job)")
    st.add_argument("job_id", type=_JOB_ID)
    st.add_argument("--json", action="store_true", help="every field of `scontrol show job` as JSON")
    st.set_defaults(func=_cmd_slurm_status)
    c = jobs.add_parser("cancel", help="cancel a job, or only send its batch shell a signal")
    c.add_argument("job_id", type=_JOB_ID)
    c.add_argument("--signal", type=OneLine(32), help="send this signal to the batch shell instead of cancelling: "
                                                      "USR1 = checkpoint and requeue, TERM = checkpoint and stop")
    c.set_defaults(func=_cmd_slurm_cancel)


def _slurm_failed(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr, flush=True)
    return EXIT_SLURM


def _cmd_slurm_submit(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ddp_toolkit import slurm
    from ddp_toolkit.config import load_config

    if not Path("launch", "train.py").is_file():
        raise UsageError("slurm submit: launch/train.py is not in the current directory; submit from the "
                         "repository root (the job runs in the directory sbatch is called from)")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run_dir).resolve()
    nproc = args.nproc_per_node if args.nproc_per_node is not None else args.gpus_per_node or 1
    try:
        script = slurm.render_sbatch(
            job_name=args.job_name or "-".join(run_dir.name.split()) or "ddp_toolkit", run_dir=str(run_dir),
            config_path=str(run_dir / "job.yaml"), overrides=args.overrides, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, nproc_per_node=nproc, partition=args.partition, time=args.time,
            account=args.account, cpus_per_task=args.cpus_per_task, mem=args.mem,
            signal=None if args.signal.lower() == "none" else args.signal, requeue=not args.no_requeue,
            python=args.python, extra_sbatch=args.sbatch_option, mode=args.mode)
    except ValueError as err:
        raise UsageError(f"slurm submit: {err}") from None
    if not args.no_preflight:
        from ddp_toolkit.trainer import preflight

        preflight(cfg, args.nodes * nproc)
    if args.nproc_per_node is None and not args.gpus_per_node:
        print("note: no --gpus-per-node and no --nproc-per-node: 1 CPU worker per node", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        return 0
    check_run_dir(str(run_dir))
    if Path(args.config).resolve() != run_dir / "job.yaml":
        shutil.copyfile(args.config, run_dir / "job.yaml")  # queued and requeued runs read this copy
    try:
        job_id = slurm.write_and_submit(script, run_dir)
    except slurm.SlurmError as err:
        return _slurm_failed(err)
    print(f"submitted job {job_id}: {args.nodes} node(s) × {nproc} worker(s), mode {args.mode}; script "
          f"{run_dir / 'job.sbatch'}, output {run_dir / f'slurm-{job_id}.out'}", file=sys.stderr)
    print(job_id)
    return 0


_STATUS_FIELDS = ("JobId", "JobName", "JobState", "Reason", "Restarts", "ExitCode", "RunTime", "NodeList", "StdOut")


def _cmd_slurm_status(args: argparse.Namespace) -> int:
    from ddp_toolkit.slurm import SlurmError, job_state

    try:
        state = job_state(args.job_id)
    except SlurmError as err:
        return _slurm_failed(err)
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        for key in (k for k in _STATUS_FIELDS if k in state):
            print(f"{key:<9} {state[key]}")
    return 0


def _cmd_slurm_cancel(args: argparse.Namespace) -> int:
    import re

    from ddp_toolkit.slurm import SlurmError, cancel

    name = None
    if args.signal is not None:
        name = args.signal.upper().removeprefix("SIG")
        if not re.fullmatch(r"[A-Z][A-Z0-9]*|\d+", name):
            raise UsageError(f"slurm cancel: --signal must be a signal name like USR1 or TERM, got {args.signal!r}")
    try:
        cancel(args.job_id, name)
    except SlurmError as err:
        return _slurm_failed(err)
    print(f"sent SIG{name} to the batch shell of job {args.job_id}" if name else f"cancelled job {args.job_id}")
    return 0


# ---- main -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddp-toolkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_plan, add_config_parser, _add_train,
                                                                     _add_launch, _add_report, _add_slurm,
                                                                     _sweep.add_sweep_parser, _add_export]


def _fail(err: Exception, code: int) -> int:
    """One line on stderr (prefixed with the rank in multi-process runs) and the exit code."""
    import os

    rank = os.environ.get("RANK")
    prefix = f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"error: {prefix}{one_line(str(err))}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ToolkitError as err:  # every error raised on purpose: one line and its own exit code
        return _fail(err, err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
