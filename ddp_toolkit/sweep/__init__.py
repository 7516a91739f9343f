"""`ddp-toolkit sweep SWEEP.yaml`: large-batch learning-rate rules tested across global batch sizes.

One point per (global batch size B, rule[, seed]), every point on the same sample budget: ceil(samples / B)
iterations of full batches, so a larger batch takes proportionally fewer steps. An optional lr grid is tried
first at the smallest batch B_ref and its best base lr is used by every rule. The verdict gives, for each rule,
the largest B whose final metric stays within a tolerance of the rule's B_ref point, next to the gradient
noise scale B_simple measured during training and the critical batch size fitted to steps-to-target
(McCandlish et al. 2018). Rules: none, linear with gradual warmup (Goyal et al. 2017), sqrt, adam_sqrt
(Malladi et al. 2022), or another optimizer (LARS, LAMB).

Modules: spec (the file), points (configs derived from one validated base), execution (training a point),
results (typed records), analysis and stats (the verdict), output and plots (the files), run, cli.
"""

from ddp_toolkit.sweep.analysis import SweepError, Verdict, default_target, steps_to_target, verdicts
from ddp_toolkit.sweep.cli import add_sweep_parser
from ddp_toolkit.sweep.execution import is_finished, run_point
from ddp_toolkit.sweep.points import Point, expand_points, iterations_for_budget, micro_batch_for
from ddp_toolkit.sweep.results import CurvePoint, PointResult
from ddp_toolkit.sweep.run import SweepReport, run_sweep
from ddp_toolkit.sweep.spec import RuleSpec, Sweep, SweepSpec, load_sweep, sweep_from_dict
from ddp_toolkit.sweep.stats import fit_critical_batch, mean_interval, t_quantile

__all__ = ["SweepSpec", "RuleSpec", "Sweep", "Point", "PointResult", "CurvePoint", "Verdict", "SweepReport",
           "SweepError", "load_sweep", "sweep_from_dict", "expand_points", "iterations_for_budget",
           "micro_batch_for", "verdicts", "default_target", "steps_to_target", "is_finished", "run_point",
           "run_sweep", "add_sweep_parser", "t_quantile", "mean_interval", "fit_critical_batch"]
