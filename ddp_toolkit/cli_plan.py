"""`ddp-toolkit plan [CONFIG] [key.path=value ...] [--world-size W ...]`: the batch plan of a config or of flags.

With `--bandwidth 25GB/s` it also prints a scaling estimate for W = 8 … 1024 (scaling.py) from `--grad-bytes` and
`--micro-step-ms`, or from a run's metrics.jsonl (`--from-run RUN_DIR`); with only those flags, only the estimate.

Without CONFIG the plan comes from the flags (any three of B, b, W, k; W and k default to 1) and every other
setting is the config default. With CONFIG its batch fills in what the flags leave out; a config value that
contradicts a batch flag gives way to the flag. Flags are the newest input, so they win.
"""

from __future__ import annotations

import argparse
import json
import sys

from ddp_toolkit.cli_types import Count, IntermixedParser, Number, OneLine, UsageError, split_config_inputs
from ddp_toolkit.config import Config, apply_overrides, load_raw, validate
from ddp_toolkit.duration import Duration
from ddp_toolkit.lr import SCALING_RULES
from ddp_toolkit.plan import BatchPlan

__all__ = ["add_plan", "plan_from_args"]

_FACTORS = ("global_batch_size", "micro_batch_size", "world_size", "grad_accum_steps")
_STOP_KEYS = {"ep": "epochs", "it": "iterations", "sp": "samples"}


class _StopAction(argparse.Action):
    """--epochs / --iterations / --samples: one setting, the run length; the last one given wins."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        unit = {"--epochs": "ep", "--iterations": "it", "--samples": "sp"}[option_string]
        setattr(namespace, self.dest, Duration(value, unit))


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print the batch plan: global batch, iterations, lr rules, schedule, cadences")
    p.__class__ = IntermixedParser  # CONFIG, overrides and flags in any order
    p.add_argument("inputs", nargs="*", metavar="[CONFIG] [key.path=value ...]",
                   help="a YAML config and overrides (default: the config defaults)")
    p.add_argument("--dataset-size", type=Count(1, 2**62), help="N: training samples per epoch (default: the "
                                                                 "config's data)")
    p.add_argument("--micro-batch-size", type=Count(), help="b: samples per device per forward")
    p.add_argument("--world-size", type=Count(), help="W: data-parallel processes (default 1)")
    p.add_argument("--grad-accum-steps", type=Count(), help="k: micro_steps per iteration")
    p.add_argument("--global-batch-size", type=Count(), help="B = b·W·k")
    for flag, kind, what in (("--epochs", Number(), "epochs"), ("--iterations", Count(1, 2**62), "iterations"),
                             ("--samples", Count(1, 2**62), "samples")):
        p.add_argument(flag, dest="stop", type=kind, action=_StopAction,
                       help=f"run length in {what} (default: the config's; the last of --epochs / --iterations / "
                            f"--samples wins)")
    p.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=None,
                   help="drop the short last global batch of each epoch (default: the config's)")
    p.add_argument("--base-lr", type=Number(), help="optim.lr: learning rate at the reference batch")
    p.add_argument("--base-batch-size", type=Count(), help="optim.base_batch_size: reference batch of the lr")
    p.add_argument("--lr-rule", nargs="+", action="extend", choices=SCALING_RULES, metavar="RULE",
                   help=f"one or more of {', '.join(SCALING_RULES)}, shown side by side (default: the config's "
                        f"optim.lr_scaling, none)")
    p.add_argument("--json", dest="output", action="store_const", const="json", help="print JSON "
                                                                                     "(see docs/config.md)")
    p.add_argument("--explain", dest="output", action="store_const", const="explain",
                   help="explain the numbers in plain sentences")
    p.add_argument("--verbose", action="store_true", help="also print the full split of the last batch")
    _add_scaling_flags(p)
    p.set_defaults(func=_cmd_plan, output="table")


_QUANTITY_TEXT = r"\s*[0-9.]+(e[+-]?[0-9]+)?\s*([kKmMgGtT]i?)?[bB]?(/s)?\s*"


def _add_scaling_flags(p: argparse.ArgumentParser) -> None:
    """--bandwidth asks for the scaling estimate; its inputs come from flags or from a run (#18)."""
    p.add_argument("--bandwidth", type=OneLine(64, _QUANTITY_TEXT, "a bandwidth such as 25GB/s or 200Gb/s"),
                   help="link bandwidth per GPU for the ring all-reduce (25GB/s; Gb/s is bits): print the expected "
                        "iteration time and communication share for W = 8 … 1024")
    p.add_argument("--grad-bytes", type=OneLine(64, _QUANTITY_TEXT, "a size such as 21MB or 2.1e7"),
                   help="gradient bytes all-reduced per iteration (21MB)")
    p.add_argument("--micro-step-ms", type=Number(), help="measured forward+backward time of one micro-step, ms")
    p.add_argument("--latency-us", type=Number(0.0, inclusive=True),
                   help="latency per ring step in µs (default 10)")
    p.add_argument("--from-run", type=OneLine(4096), metavar="RUN_DIR",
                   help="take grad bytes and micro-step time from RUN_DIR/metrics.jsonl")


def _config_of(args: argparse.Namespace) -> tuple[Config, bool]:
    """The config (file or defaults, overrides, then the lr and run-length flags) and whether a file was given."""
    path, inputs = split_config_inputs(args.inputs)
    raw = load_raw(path) if path is not None else {}
    updates = [f"optim.lr={args.base_lr!r}"] if args.base_lr is not None else []
    updates += [f"optim.base_batch_size={args.base_batch_size}"] if args.base_batch_size is not None else []
    updates += [f"batch.drop_last={str(args.drop_last).lower()}"] if args.drop_last is not None else []
    if args.stop is not None:
        value = args.stop.value if args.stop.unit == "ep" else int(args.stop.value)
        updates.append(f"train.{_STOP_KEYS[args.stop.unit]}={value!r}")
    cfg = validate(apply_overrides(raw, inputs + updates))
    if args.dataset_size is None and path is None and not inputs:
        raise UsageError("plan: give a CONFIG, overrides or --dataset-size")
    return cfg, path is not None


def _factors(args: argparse.Namespace, cfg: Config, from_file: bool) -> dict:
    """B, b, W, k: the flags first; the config's batch fills in, unless it contradicts a batch flag."""
    factors = {name: getattr(args, name) for name in _FACTORS if getattr(args, name) is not None}
    batch_flags = bool(set(factors) - {"world_size"})
    if from_file or not batch_flags:
        for name in ("micro_batch_size", "global_batch_size", "grad_accum_steps"):
            value = getattr(cfg.batch, name)
            if value is None or name in factors:
                continue
            trial = {**factors, name: value}
            b, W, k, B = (trial.get(n) for n in ("micro_batch_size", "world_size", "grad_accum_steps",
                                                 "global_batch_size"))
            if len(trial) == 4 and batch_flags and b * W * k != B:
                continue  # the config's value contradicts a flag: the flag wins
            factors = trial
    for name in ("world_size", "grad_accum_steps"):
        if len(factors) < 3 and name not in factors:
            factors[name] = 1
    if len(factors) < 3:
        raise UsageError("plan: give --micro-batch-size or --global-batch-size")
    return factors


def plan_from_args(args: argparse.Namespace) -> tuple[Config, BatchPlan]:
    """The config and the plan the flags and CONFIG describe."""
    from ddp_toolkit.config_plan import dataset_size

    cfg, from_file = _config_of(args)
    n = args.dataset_size if args.dataset_size is not None else dataset_size(cfg)
    return cfg, BatchPlan.solve(n, drop_last=cfg.batch.drop_last, **_factors(args, cfg, from_file))


def _scaling(args: argparse.Namespace, grad_accum_steps: int | None) -> dict | None:
    """The scaling estimate (scaling.as_dict) when --bandwidth is given; one line for missing or bad inputs."""
    from ddp_toolkit import scaling

    if args.bandwidth is None:
        if args.grad_bytes or args.micro_step_ms or args.from_run or args.latency_us is not None:
            raise UsageError("plan: --grad-bytes, --micro-step-ms, --latency-us and --from-run need --bandwidth")
        return None
    try:
        measured = scaling.from_run(args.from_run) if args.from_run else {}
        inputs = {"bandwidth": scaling.parse_bandwidth(args.bandwidth),
                  "grad_bytes": scaling.parse_size(args.grad_bytes) if args.grad_bytes else measured.get("grad_bytes"),
                  "micro_step_seconds": args.micro_step_ms / 1e3 if args.micro_step_ms
                  else measured.get("micro_step_seconds"),
                  "latency_s": (args.latency_us if args.latency_us is not None else 10.0) / 1e6,
                  "grad_accum_steps": grad_accum_steps or measured.get("grad_accum_steps", 1),
                  "max_share": scaling.DEFAULT_MAX_SHARE}
    except (ValueError, OSError) as err:
        raise UsageError(f"plan: {err}") from None
    if inputs["grad_bytes"] is None or not inputs["micro_step_seconds"]:
        raise UsageError("plan: --bandwidth needs --grad-bytes and --micro-step-ms, or --from-run RUN_DIR")
    points = scaling.estimate(inputs["grad_bytes"], inputs["micro_step_seconds"], inputs["bandwidth"],
                              grad_accum_steps=inputs["grad_accum_steps"], latency_s=inputs["latency_s"],
                              max_share=inputs["max_share"])
    return {**scaling.as_dict(points, {**inputs, **{k: v for k, v in measured.items() if k.endswith("_from")}}),
            "text": scaling.render(points, inputs)}


def _cmd_plan(args: argparse.Namespace) -> int:
    from ddp_toolkit import plan_report

    if args.bandwidth is not None and not (args.inputs or args.dataset_size):  # the estimate alone
        estimate = _scaling(args, args.grad_accum_steps)
        print(json.dumps(estimate, indent=2) if args.output == "json" else estimate["text"])
        return 0
    cfg, plan = plan_from_args(args)
    info = plan_report.plan_info(cfg, plan, list(dict.fromkeys(args.lr_rule or [])))
    estimate = _scaling(args, plan.grad_accum_steps)
    if estimate is not None:
        info["scaling"] = estimate
    for kind in ("warning", "note"):
        for line in info[f"{kind}s"]:
            print(f"{kind}: {line}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(info, indent=2, ensure_ascii=False))
    elif args.output == "explain":
        print(plan_report.explain_plan(plan, info))
    else:
        plan_report.print_plan_table(plan, info, verbose=args.verbose)
    if estimate is not None and args.output != "json":
        print(estimate["text"])
    return 0
