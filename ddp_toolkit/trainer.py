"""The training loop: k micro-steps per iteration, gradient sync on the last, one optimizer step.

Loss weighting: every micro-step's loss is Σ(item losses) / (items in the whole global batch) × W, so the
synced gradient of an iteration is the mean gradient over the items of the global batch, short batches
included. The loop is thin: each component decides its own cadence (`metrics.should_log`,
`checkpoints.should_save`, `evaluator.should_eval`, `stop_vote.due`) and the iteration reduces its scalars
in at most one all-reduce.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddp_toolkit import plan_report
from ddp_toolkit.batch_schedule import epochs_at
from ddp_toolkit.batches import batch_as_is, empty_like, to_device
from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.dist import DistEnv, all_reduce_sum, apply_numerics, check_device_settings, distributed
from ddp_toolkit.engines import Engine, build_engine
from ddp_toolkit.errors import RunError
from ddp_toolkit.evaluation import Evaluator
from ddp_toolkit.lr import build_scheduler
from ddp_toolkit.metrics import IterationResult, MetricsLogger, ScalarReduce, optimizer_hparams
from ddp_toolkit.noise_scale import NoiseMeter, NoiseScaleEstimator
from ddp_toolkit.progress import Progress
from ddp_toolkit.recipe import (
    batch_schedule_for,
    fingerprint,
    lr_info,
    make_optimizer,
    preflight,
    schedule_for,
    schedule_notes,
)
from ddp_toolkit.recipe import train_from_config as train_from_config
from ddp_toolkit.reporting import Reporter, write_final_weights
from ddp_toolkit.rundir import RunDirLock, archive_previous_run, check_shared, check_writable
from ddp_toolkit.sampler import GlobalBatchSampler, collate_allow_empty
from ddp_toolkit.state import CheckpointManager, EngineState, broadcast_from_main
from ddp_toolkit.step import Step, TupleStep, default_loss
from ddp_toolkit.stopping import StopVote

__all__ = ["Trainer", "TrainingStopped", "default_loss", "preflight", "train_from_config"]


def _sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A device tensor summed over ranks, not read on the host."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


class TrainingStopped(RunError):
    """Training ended early on purpose (non-finite loss with on_nonfinite=stop); the message says where."""


EngineFactory = Callable[[DistEnv, Any, Config], Engine]


class Trainer:
    """`Trainer(model, train_set, config, loss_fn=..., eval_set=...).fit()` — see the module docstring.

    `step` replaces the (inputs, targets) contract (see step.py); `engine` is an Engine class or factory
    `(env, plan, config) -> Engine` (default: the one `train.engine` names).
    """

    def __init__(self, model: nn.Module, train_set: Dataset, config: Config, *,
                 loss_fn: Callable[[Any, Any], torch.Tensor] = default_loss, step: Step | None = None,
                 eval_set: Dataset | None = None, env: DistEnv | None = None,
                 count_items: Callable[[Any], int] | None = None, engine: EngineFactory | None = None) -> None:
        cfg, self.cfg = config, config
        self.env = env = env or DistEnv.from_env()
        self.train_set, self.run_dir = train_set, Path(cfg.run_dir)
        self.step = step or TupleStep(loss_fn, count_items=count_items)
        self.batches = batch_schedule_for(cfg, len(train_set), env.world_size)  # B by phase (one phase: fixed)
        self.plan = plan = self.batches.first  # the plan of the current phase (set by _enter_phase)
        self.total_iterations = self.batches.iterations_in(cfg.train.stop)
        self.schedule = schedule_for(cfg, plan, self.total_iterations, self.batches)
        self.progress = Progress()
        self._phase = 0
        # the engine checks its config (e.g. a DeepSpeed JSON against the plan) before any rendezvous
        self.engine = engine(env, plan, cfg) if engine is not None else build_engine(cfg, env, plan)
        if not self.batches.is_fixed and not self.engine.batch_size_may_change:
            self.engine.close()
            raise ConfigError(f"batch.schedule: the {self.engine.name} engine fixes the batch size when it starts "
                              f"(train.engine: ddp, accelerate or fsdp can change it mid-run)")
        self._exit = contextlib.ExitStack()
        if env.is_main:  # one run per run_dir; found unwritable now, not at the first checkpoint
            self._exit.enter_context(RunDirLock(self.run_dir, rank=env.rank).acquire())
            check_writable(self.run_dir)
        self._exit.enter_context(distributed(env, timeout_s=cfg.train.dist_timeout_s))
        try:
            self._build(model, train_set, eval_set)
        except BaseException:
            with contextlib.suppress(Exception):
                self.engine.close()  # an engine may have made its own process group (W = 1 DeepSpeed, FSDP)
            self._exit.close()  # leave the process group if building failed
            raise

    def _build(self, model: nn.Module, train_set: Dataset, eval_set: Dataset | None) -> None:
        """Everything that needs the process group: the wrapped model, data, reports, checkpoints."""
        cfg, env, plan = self.cfg, self.env, self.plan
        if env.is_distributed:  # #22: every rank must see rank 0's run_dir (multi-node: a shared file system)
            check_shared(self.run_dir, env.rank, env.world_size, lambda v: all_reduce_sum(v, env.device))
        self._prepare_model(model)
        self.scheduler = build_scheduler(self.engine.optimizer, self.schedule)
        if cfg.data.order == "distributed_sampler":  # #20 item 5: torch's DistributedSampler order (orders.py)
            from ddp_toolkit.orders import DistributedSamplerBatches

            self.sampler = DistributedSamplerBatches(len(train_set), plan, env.rank, seed=cfg.train.seed)
        else:
            self.sampler = GlobalBatchSampler.from_plan(plan, env.rank, seed=cfg.train.seed)
        self.collate_fn = batch_as_is if hasattr(train_set, "__getitems__") else collate_allow_empty
        # its own generator: starting an iterator draws a base seed from it, never from the global RNG (a resume
        # mid-epoch starts one more iterator than the straight run: with the global RNG, dropout would differ)
        self._loader_rng = torch.Generator()
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                                 generator=self._loader_rng, **self._loader_options())
        self._empty_template = None
        if eval_set is not None and len(eval_set) == 0:
            eval_set = None  # data.eval_size: 0 means no evaluation
        every = self.batches.iterations_in(cfg.train.eval_every) if cfg.train.eval_every else 0
        self.evaluator = None if eval_set is None else Evaluator(eval_set, self.step, env, plan.micro_batch_size * 4,
                                                                 self.collate_fn, every)
        self.noise = NoiseScaleEstimator() if cfg.train.noise_scale else None
        self.noise_meter = None if self.noise is None else NoiseMeter(
            self.noise, self.engine, world_size=env.world_size, local_batch_size=plan.local_batch_size,
            global_batch_size=plan.global_batch_size, grad_accum_steps=plan.grad_accum_steps,
            reduce_sum=_sum_over_ranks, dataset_size=plan.dataset_size if cfg.train.noise_scale_finite_n else None)
        self.reporter = Reporter(cfg, env, plan, enabled=env.is_main)
        self.metrics = MetricsLogger(self.reporter, plan, self.progress, cfg.train.log_every)
        self.stop_vote = StopVote(self.run_dir, is_main=env.is_main)
        self._deferred_vote: torch.Tensor | None = None
        states = {"scheduler": self.scheduler, "progress": self.progress}
        if self.noise_meter is not None:
            states["noise"] = self.noise_meter  # flushes its queued norms before saving
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", engine_state=EngineState(self.engine), states=states,
            fingerprint=fingerprint(cfg, plan, self.schedule), rank=env.rank, barrier=self.engine.barrier,
            every=self.batches.iterations_in(cfg.train.checkpoint_every) if cfg.train.checkpoint_every else 0,
            keep=cfg.train.keep_checkpoints, allow_change=cfg.train.allow_config_change)
        self.summary: dict = {}

    def _loader_options(self) -> dict:
        """num_workers, pin_memory (default: on CUDA) and, with workers, prefetch_factor / persistent_workers."""
        train, cuda = self.cfg.train, self.env.device.type == "cuda"
        out = {"num_workers": train.num_workers, "pin_memory": cuda if train.pin_memory is None else train.pin_memory}
        if train.num_workers:
            out.update(prefetch_factor=train.prefetch_factor, persistent_workers=train.persistent_workers)
        return out

    def _prepare_model(self, model: nn.Module) -> None:
        train, env = self.cfg.train, self.env
        check_device_settings(env.device, precision=train.precision, sync_batchnorm=train.sync_batchnorm,
                              distributed=env.is_distributed)  # #22: one line for what the device cannot run
        apply_numerics(env.device, deterministic=train.deterministic, tf32=train.tf32)
        torch.manual_seed(self.cfg.train.seed + self.env.rank)
        if self.cfg.train.sync_batchnorm and self.env.is_distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.env.device)
        if train.compile:  # the forward, in place: state_dict keys unchanged, the engine wraps the model as usual
            model.forward = types.MethodType(torch.compile(type(model).forward), model)  # (Module.compile traces
            # nothing in torch 2.13); a method, so a deep copy (the FLOP count's meta copy) binds its own model
        self.engine.prepare(model, make_optimizer(self.cfg, self.plan, model.parameters()))

    def lr_info(self) -> dict:
        """Base and scaled learning rate, the rule and the reference batch, for the plan and metrics."""
        return lr_info(self.cfg, self.plan)

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the configured length; returns the summary (also written to run_dir/summary.json)."""
        try:
            resumed = self._resume_or_start_fresh()
            self.reporter.truncate_after(self.progress.iteration)  # rows after the checkpoint are redone
            self.reporter.start(self._plan_info(resumed), self.progress, self.total_iterations)
            for note in schedule_notes(self.cfg, self.batches, self.total_iterations):
                self.reporter.warn(note)
            self.stop_vote.install()
            self._run()
        finally:
            self.close()
        return self.summary

    def _resume_or_start_fresh(self) -> Path | None:
        """Rank 0 chooses the checkpoint (every rank loads the same one); a fresh run moves an older one aside."""
        path = broadcast_from_main(self.checkpoints.find(self.cfg.train.resume) if self.env.is_main else None)
        if path is not None:
            self.checkpoints.load(path)
            p = self.progress
            if p.epoch_position < 0:  # a checkpoint from before batch-size schedules: a fixed B, batches from 0
                p.epoch_position = min(p.iteration_in_epoch * self.plan.global_batch_size, self.plan.dataset_size)
        elif self.env.is_main:
            moved = archive_previous_run(self.run_dir)
            if moved:
                self.reporter.warn(f"fresh run: the previous run's outputs were moved to {moved[0].parent}")
        self.engine.barrier()
        return path

    def close(self) -> None:
        """Restore signal handlers, close the engine and the reporter, leave the process group (always)."""
        with self._exit:
            self.stop_vote.restore()
            try:
                self.engine.close()
            finally:
                self.reporter.close()

    def _run(self) -> None:
        t0, last_eval = time.perf_counter(), None
        self.metrics.restart_window()
        while self.progress.iteration < self.total_iterations:
            batches = self._epoch_batches()
            while self.progress.iteration < self.total_iterations:
                result = self._iteration(batches)
                it = self.progress.iteration
                last = it == self.total_iterations
                self._reduce_and_log(result, it, last)
                if self.stop_vote.stop and not last:
                    return self._stop_early("stop requested", requeue=True)
                if self.evaluator is not None and self.evaluator.should_eval(it, last):
                    last_eval = self._evaluate()
                if self.checkpoints.should_save(it, last):
                    self.checkpoints.save(it)
                if self.cfg.train.halt_at == it and not last:
                    return self._stop_early("halted (train.halt_at)", requeue=False)
                if self.progress.iteration_in_epoch == 0:
                    break  # epoch finished: next epoch's order
                if self.batches.phase_index(self.progress.position()) != self._phase:
                    break  # a new batch size: batches of it from this position on
        self._finish(time.perf_counter() - t0, last_eval)

    def _epoch_batches(self):
        """This rank's micro-batches from the current position (the position lives in `progress`)."""
        p = self.progress
        self._enter_phase(self.batches.phase_index(p.position()))
        self.sampler.set_epoch(p.epoch)
        if isinstance(self.sampler, GlobalBatchSampler):
            self.sampler.set_plan(self.plan)
            self.sampler.seek(p.epoch_position)
        else:
            self.sampler.advance(p.iteration_in_epoch)
        # worker seeds follow the position, so a resumed run's workers get what the straight run's would
        self._loader_rng.manual_seed(hash((self.cfg.train.seed, self.env.rank, p.epoch, p.iteration_in_epoch)))
        return iter(self.loader)

    def _enter_phase(self, phase: int) -> None:
        """Use batch-size phase `phase`: its plan (B, k) everywhere, and its betas, eps and weight decay when a rule
        co-scales them with B (optim.beta2_scaling, weight_decay_scaling, adam_sqrt; the lr is the scheduler's)."""
        self._phase, self.plan = phase, self.batches.phases[phase].plan
        self.metrics.plan = self.plan
        if self.noise_meter is not None:
            self.noise_meter.set_plan(self.plan)
        if not self.batches.is_fixed:
            info = lr_info(self.cfg, self.plan)
            for group in self.engine.optimizer.param_groups:
                for key in ("betas", "eps", "weight_decay"):
                    if key in group:
                        group[key] = info[key]

    def _iteration(self, batches) -> IterationResult:
        """One iteration: k micro-steps, the last one synced, then clip, step, schedule, zero_grad."""
        engine, step, k = self.engine, self.step, self.plan.grad_accum_steps
        t_start = time.perf_counter()
        position = self.progress.position()
        samples = self.batches.batch_size_at(position)
        micro_batches = [self._next_micro_batch(batches) for _ in range(k)]
        counts = [step.count(mb) for mb in micro_batches]  # on the CPU batch, before any forward
        if self.metrics.wants_flops:  # once, rank 0: FLOPs of one micro-step on a meta copy (flops.py)
            if engine.flops_countable:
                self.metrics.count_flops(engine.module, step, micro_batches, counts)
            else:
                self.metrics.wants_flops = False
                self.reporter.warn(f"FLOPs are not counted with the {engine.name} engine (no flops_per_second, mfu)")
        t_data = time.perf_counter()  # timing: micro-batches fetched (host clocks only: no device sync)
        items = self._global_items(sum(counts), samples)
        scale = engine.loss_multiplier / items
        comm_before = engine.comm.snapshot()
        if self.noise_meter is not None:
            self.noise_meter.begin(samples)
        item_losses = []
        for m, batch in enumerate(micro_batches):
            sync = m == k - 1
            with engine.sync_context(sync), engine.autocast():
                _, losses = step.forward(engine.model, to_device(batch, self.env.device))
                loss = losses.sum() * scale
            engine.backward(loss, sync)
            item_losses.append(losses.detach())
            if self.noise_meter is not None:
                self.noise_meter.after_micro_step(m, counts[m])
        t_compute = time.perf_counter()  # timing: k forward+backward passes done (the synced all-reduce included)
        hparams = optimizer_hparams(engine.optimizer)  # what this iteration's step uses
        grad_norm, skipped = self._clip_and_step()
        t_step = time.perf_counter()  # timing: norm, clip, optimizer step, schedule, zero_grad done
        self.progress.advance(self.batches.after(position, samples), items, skipped)
        comm = tuple(a - b for a, b in zip(engine.comm.snapshot(), comm_before, strict=True))
        return IterationResult(samples=samples, items=items, item_losses=item_losses, grad_norm=grad_norm,
                               hparams=hparams, comm=comm, skipped=skipped, seconds=time.perf_counter() - t_start,
                               first_items=counts[0], data_seconds=t_data - t_start,
                               compute_seconds=t_compute - t_data, step_seconds=t_step - t_compute)

    def _next_micro_batch(self, batches):
        batch = next(batches)
        if batch is None or (isinstance(batch, list) and not batch):
            if self._empty_template is None:
                first = (self.train_set.__getitems__([0]) if hasattr(self.train_set, "__getitems__")
                         else [self.train_set[0]])
                self._empty_template = empty_like(self.collate_fn(first))
            batch = self._empty_template
        return batch

    def _global_items(self, local: int, samples: int) -> int:
        """Items of the whole global batch: the plan's sample count, or the counts summed over ranks."""
        if self.step.counts_samples:
            return samples  # one item per sample: known on every rank without communication
        return int(all_reduce_sum([float(local)], self.env.device)[0])

    def _clip_and_step(self) -> tuple[float, bool]:
        """(global gradient norm, whether the update was skipped); the norm read is the one host sync."""
        engine, clip = self.engine, self.cfg.optim.grad_clip
        total_norm = engine.grad_norm()
        if self._deferred_vote is not None:  # the stop vote rides on this read: one synchronisation for both
            vote, self._deferred_vote = self._deferred_vote, None
            norm, votes = torch.stack([total_norm.double().reshape(()).to(vote.device), vote.reshape(())]).tolist()
            self.stop_vote.record(votes)
        else:
            norm = float(total_norm)
        skipped = not math.isfinite(norm)
        if skipped:
            self._nonfinite(norm)
        else:
            if clip is not None:
                engine.clip_grad(clip, total_norm=total_norm)  # reuse the norm: no second pass
            engine.step()
        self.scheduler.step()
        engine.zero_grad()
        return norm, skipped

    def _nonfinite(self, norm: float) -> None:
        """Synced gradients are equal on every rank, so every rank takes the same decision here."""
        it = self.progress.iteration + 1
        if self.cfg.train.on_nonfinite == "skip":
            self.reporter.warn(f"iteration {it}: non-finite gradient norm {norm}; skipped the update")
            return
        self.engine.zero_grad()
        self.checkpoints.save(self.progress.iteration)
        error = TrainingStopped(f"non-finite gradient norm {norm} at iteration {it}; the last good state is "
                                f"checkpointed at iteration {it - 1} (set train.on_nonfinite=skip to skip such "
                                f"iterations)")
        self.summary = {"stopped": "non_finite", "iteration": it, "error": str(error)}
        self.reporter.finish(self.summary)  # summary.json says why the run ended (sweeps read it)
        raise error

    # ---- the iteration's one scalar reduce: logged loss and stop vote ---------------------------------------
    def _reduce_and_log(self, result: IterationResult, it: int, last: bool) -> None:
        logged = self.metrics.should_log(it, last)
        if self.noise_meter is not None:  # queued on the device; read on logged iterations
            self.noise_meter.after_sync(result.grad_norm, result.first_items, result.items)
        reduce = ScalarReduce()
        if logged:
            reduce.add("loss_sum", self.metrics.local_loss_sum(result))
            reduce.add("stop", self.stop_vote.local_request())
        elif self.stop_vote.due(it):  # summed now on the device, read with the next iteration's gradient norm
            request = torch.tensor([self.stop_vote.local_request()], dtype=torch.float64, device=self.env.device)
            self._deferred_vote = _sum_over_ranks(request)
        reduced = reduce.run(self.env.device)
        if "stop" in reduced:
            self.stop_vote.record(reduced["stop"])
        if logged:
            extra = {"tokens_seen": self.progress.items_seen} if self.step.item_name == "tokens" else {}
            if self.noise_meter is not None:
                extra["grad_noise_scale"] = self.noise_meter.noise_scale
            self.metrics.log(result, reduced["loss_sum"], extra)

    # ---- evaluation, the end of the run ------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Exact evaluation of the eval set now (every rank calls this)."""
        return self._evaluate()

    def _evaluate(self) -> dict:
        p = self.progress
        result = {"iteration": p.iteration, "epoch": epochs_at(p.position(), self.plan.dataset_size),
                  "samples_seen": p.samples_seen}
        with self.engine.evaluation() as model:  # a sharded engine gathers its weights once for the whole pass
            result.update(self.evaluator.run(model))
        self.reporter.log_eval(result)
        return result

    def _stop_early(self, why: str, requeue: bool) -> None:
        """Checkpoint after this iteration and return (exit code 0); `requeue`: a SLURM requeue has work to do."""
        it = self.progress.iteration
        path = self.checkpoints.save(it)
        if requeue:
            self.stop_vote.acknowledge(f"checkpoint {path.name} at iteration {it}")
            why = f"{why} ({self.stop_vote.describe()})"
        self.reporter.warn(f"{why} at iteration {it}: checkpoint {path.name} written; run again with "
                           f"train.resume=auto to continue")
        self.summary = {"preempted" if requeue else "halted": True, "iteration": it}

    def _finish(self, seconds: float, last_eval: dict | None) -> None:
        self.checkpoints.save(self.progress.iteration)
        self._save_final()
        p, last = self.progress, self.reporter.last_metrics
        self.summary = {
            "iterations": p.iteration, "epochs": epochs_at(p.position(), self.plan.dataset_size),
            "samples_seen": p.samples_seen,
            "items_seen": p.items_seen, "skipped_iterations": p.skipped_iterations, "wall_seconds": seconds,
            "samples_per_second": p.samples_seen / seconds if seconds > 0 else None,
            "final_loss": self.reporter.last_loss, "allreduces_per_iteration": last.get("allreduces_per_iteration"),
            "allreduce_rounds_per_iteration": last.get("allreduce_rounds_per_iteration"),
            **({k: v for k, v in last_eval.items() if k.startswith("eval_")} if last_eval else {}),
        }
        self.reporter.finish(self.summary)
        self.engine.barrier()

    def _save_final(self) -> None:
        weights = self.engine.model_state()  # every rank: a sharded engine gathers the full weights to rank 0
        if self.env.is_main:
            write_final_weights(self.run_dir, weights)
        self.engine.barrier()

    def _plan_info(self, resumed: Path | None) -> dict:
        info = {**plan_report.plan_info(self.cfg, self.batches.first), "total_iterations": self.total_iterations,
                "warmup_iterations": self.schedule.warmup_iterations, "engine": self.engine.name,
                "backend": self.env.backend if self.env.is_distributed else "none",
                "launcher": self.env.describe_launcher(), "seed": self.cfg.train.seed}
        if resumed is not None:
            info["resumed_from"] = resumed.name
        return info
