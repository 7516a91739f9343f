"""The training loop: k micro-steps per iteration, gradient sync on the last, one optimizer step.

Loss weighting: every micro-step's loss is Σ(item losses) / (items in the whole global batch) × W, so
the synced gradient of an iteration is the mean gradient over the global batch, short batches included.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddp_toolkit import checkpoint as ckpt
from ddp_toolkit.config import Config, ConfigError
from ddp_toolkit.dist import DistEnv, all_reduce_sum, distributed
from ddp_toolkit.engines import build_engine
from ddp_toolkit.errors import RunError
from ddp_toolkit.lr import Schedule, adam_sqrt_hparams, build_scheduler, scaled_lr
from ddp_toolkit.noise_scale import NoiseScaleEstimator
from ddp_toolkit.optim import build_optimizer
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.progress import Progress
from ddp_toolkit.reporting import Reporter
from ddp_toolkit.sampler import EvalSampler, GlobalBatchSampler, collate_allow_empty, reduce_metric_sums

__all__ = ["Trainer", "TrainingStopped", "default_loss"]


def plan_for(cfg: Config, dataset_size: int, world_size: int) -> BatchPlan:
    """The batch plan of a config at a world size: k given, or derived from batch.global_batch_size."""
    b = cfg.batch
    k = b.grad_accum_steps if b.grad_accum_steps or b.global_batch_size else 1
    return BatchPlan.solve(dataset_size, global_batch_size=b.global_batch_size, micro_batch_size=b.micro_batch_size,
                           world_size=world_size, grad_accum_steps=k, drop_last=b.drop_last)


def lr_info(cfg: Config, plan: BatchPlan) -> dict:
    """Base and scaled learning rate, the rule and the reference batch."""
    o = cfg.optim
    ref = o.base_batch_size or plan.global_batch_size
    return {"base_lr": o.lr, "base_batch_size": ref, "lr_rule": o.lr_scaling,
            "scaled_lr": scaled_lr(o.lr, plan.global_batch_size, ref, o.lr_scaling)}


def schedule_for(cfg: Config, plan: BatchPlan, total: int) -> Schedule:
    """The lr schedule of the run, durations converted through the plan; ConfigError when impossible."""
    o = cfg.optim
    peak = lr_info(cfg, plan)["scaled_lr"]
    warmup = plan.iterations_in(o.warmup or 0)
    if warmup > total:
        raise ConfigError(f"optim.warmup {o.warmup!r} is {warmup} iterations, longer than the run of {total} "
                          f"iterations; use a warmup of at most {total} iterations")
    try:
        return Schedule(peak_lr=peak, total_iterations=total, warmup_iterations=warmup,
                        warmup_start_factor=o.warmup_start_factor, decay=o.schedule,
                        step_milestones=tuple(plan.iterations_in(m) for m in o.step_milestones),
                        step_gamma=o.step_gamma, min_lr=min(o.min_lr, peak))
    except ValueError as err:
        raise ConfigError(f"optim: {err}") from None


def preflight(cfg: Config, world_size: int) -> BatchPlan:
    """Check what can be checked before any worker starts: data, factories, plan, schedule."""
    from ddp_toolkit.data import build_data, load_factory

    try:
        train_set, _ = build_data(cfg.data)
        if cfg.model.name == "custom":
            load_factory(cfg.model.factory, "model.factory")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    plan = plan_for(cfg, len(train_set), world_size)
    schedule_for(cfg, plan, plan.iterations_in(cfg.train.stop))
    return plan


class TrainingStopped(RunError):
    """Training ended early on purpose (non-finite loss with on_nonfinite=stop); the message says where."""


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (reduction='none'): the trainer does the weighting itself."""
    return F.cross_entropy(outputs, targets, reduction="none")


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _empty_like(batch):
    """The same structure with zero rows: the input of a rank whose micro-step got no samples."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    return batch


def _batch_as_is(batch):
    """Collate for datasets whose `__getitems__` already returns a batch (picklable for worker processes)."""
    return batch


class _StopFlag:
    """A stop request: SIGUSR1 / SIGTERM to this process, or the preemption flag file.

    The SLURM batch script touches `$DDP_TOOLKIT_PREEMPT_FILE` (default `run_dir/PREEMPT`) when it gets the
    warning signal or SIGTERM, because torchrun does not forward SIGUSR1 to its workers.
    """

    def __init__(self, run_dir: Path) -> None:
        from ddp_toolkit.cluster import PREEMPT_ENV, PREEMPT_FILE_NAME

        self.signal: str | None = None
        self.file = Path(os.environ.get(PREEMPT_ENV) or run_dir / PREEMPT_FILE_NAME)
        self.watched = PREEMPT_ENV in os.environ
        self._old: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.signal is None and self.file.exists():
            self.signal = "PREEMPT file"
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """`Trainer(model, train_set, config, loss_fn=..., eval_set=...).fit()` — see the module docstring."""

    def __init__(self, model: nn.Module, train_set: Dataset, config: Config, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
                 eval_set: Dataset | None = None, env: DistEnv | None = None,
                 count_items: Callable[[object], int] | None = None,
                 sync_every_micro_step: bool = False) -> None:
        if eval_set is not None and len(eval_set) == 0:
            eval_set = None  # data.eval_size: 0 means no evaluation
        self.model, self.train_set, self.eval_set, self.cfg = model, train_set, eval_set, config
        self.loss_fn, self.count_items = loss_fn, count_items
        self.env = env or DistEnv.from_env()
        self.sync_every_micro_step = sync_every_micro_step
        self.run_dir = Path(config.run_dir)
        self.progress = Progress()
        self.plan = self._make_plan()
        self.summary: dict = {}

    # ---- setup ---------------------------------------------------------------------------------------
    def _make_plan(self) -> BatchPlan:
        return plan_for(self.cfg, len(self.train_set), self.env.world_size)

    def _iterations(self, duration) -> int:
        return self.plan.iterations_in(duration)

    def lr_info(self) -> dict:
        """Base and scaled learning rate, the rule and the reference batch, for the plan and metrics."""
        return lr_info(self.cfg, self.plan)

    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        self.total_iterations = self.plan.iterations_in(cfg.train.stop)
        info = self.lr_info()
        self.schedule = schedule_for(cfg, self.plan, self.total_iterations)
        torch.manual_seed(cfg.train.seed + env.rank)
        model = self.model
        if cfg.train.sync_batchnorm and env.is_distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(env.device)
        optimizer = self._optimizer(model, info)
        self.engine.prepare(model, optimizer)
        self.scheduler = build_scheduler(self.engine.optimizer, self.schedule)
        self.sampler = GlobalBatchSampler.from_plan(self.plan, env.rank, seed=cfg.train.seed)
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=cfg.train.num_workers,
                                 collate_fn=self._collate())
        self.noise = NoiseScaleEstimator() if cfg.train.noise_scale else None
        self.reporter = Reporter(cfg, env, self.plan, enabled=env.is_main)
        self.stop_flag = _StopFlag(self.run_dir)
        self._empty_template = None
        self._autocast = (functools.partial(torch.autocast, env.device.type, torch.bfloat16)
                          if cfg.train.precision == "bf16" else contextlib.nullcontext)
        self._stop_votes = 0.0
        self._window_start, self._window_samples = time.perf_counter(), 0

    def _optimizer(self, model: nn.Module, info: dict) -> torch.optim.Optimizer:
        """The configured optimizer at the scaled lr; adam_sqrt also rescales betas and eps (Malladi et al.)."""
        o = self.cfg.optim
        betas, eps = tuple(o.betas), o.eps
        if o.lr_scaling == "adam_sqrt":
            betas, eps = adam_sqrt_hparams(betas, eps, self.plan.global_batch_size / info["base_batch_size"])
        return build_optimizer(model.parameters(), o.name, info["scaled_lr"], momentum=o.momentum,
                               weight_decay=o.weight_decay, betas=betas, eps=eps)

    def _collate(self):
        if hasattr(self.train_set, "__getitems__"):
            return _batch_as_is  # the dataset already returns a whole batch
        return collate_allow_empty

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the configured length; returns the summary (also written to run_dir/summary.json)."""
        # the engine checks its config (e.g. a DeepSpeed JSON against the plan) before any rendezvous
        self.engine = build_engine(self.cfg, self.env, self.plan, sync_every_micro_step=self.sync_every_micro_step)
        with distributed(self.env, timeout_s=self.cfg.train.dist_timeout_s):
            self._setup()
            resumed = self._maybe_resume()
            self.reporter.truncate_after(self.progress.iteration)  # a fresh run starts a fresh metrics.jsonl
            self.reporter.start(self._plan_info(resumed), self.progress, self.total_iterations)
            self.stop_flag.install()
            try:
                self._run()
            finally:
                self.stop_flag.restore()
                self.reporter.close()
        return self.summary

    def _run(self) -> None:
        train = self.cfg.train
        eval_every = self._iterations(train.eval_every) if train.eval_every else 0
        ckpt_every = self._iterations(train.checkpoint_every) if train.checkpoint_every else 0
        t0, last_eval = time.perf_counter(), None
        self._window_start, self._window_samples = t0, self.progress.samples_seen
        while self.progress.iteration < self.total_iterations:
            self.sampler.set_epoch(self.progress.epoch)
            self.sampler.advance(self.progress.iteration_in_epoch)
            batches = iter(self.loader)
            while self.progress.iteration < self.total_iterations:
                row = self._iteration(batches)
                it = self.progress.iteration
                last = it == self.total_iterations
                logged = it % train.log_every == 0 or last
                if logged:
                    self._log(row)
                if self._stop_requested(logged) and not last:
                    self._preempt()
                    return
                if self.eval_set is not None and ((eval_every and it % eval_every == 0) or last):
                    last_eval = self.evaluate()
                if ckpt_every and it % ckpt_every == 0 and not last:
                    self.save()
                if train.halt_at == it and not last:
                    self._halt()
                    return
                if self.progress.iteration_in_epoch == 0:
                    break  # epoch finished: next epoch's order
        self.save()
        self._save_final()
        self._finish(time.perf_counter() - t0, last_eval)

    def _next_micro_batches(self, batches) -> list:
        out = []
        for _ in range(self.plan.grad_accum_steps):
            batch = next(batches)
            if batch is None or (isinstance(batch, list) and not batch):
                batch = self._empty_batch()
            out.append(_to_device(batch, self.env.device))
        return out

    def _empty_batch(self):
        if self._empty_template is None:
            self._empty_template = _empty_like(self.loader.collate_fn(
                self.train_set.__getitems__([0]) if hasattr(self.train_set, "__getitems__")
                else [self.train_set[0]]))
        return self._empty_template

    def _global_items(self, micro_batches: list, samples: int) -> int:
        if self.count_items is None:
            return samples
        local = sum(self.count_items(mb) for mb in micro_batches)
        return int(all_reduce_sum([float(local)], self.env.device)[0])

    def _iteration(self, batches) -> dict:
        """One iteration: k micro-steps, the last one synced, then clip, step, schedule, zero_grad."""
        plan, engine, k = self.plan, self.engine, self.plan.grad_accum_steps
        t_start = time.perf_counter()
        samples = plan.batch_size_of(self.progress.iteration_in_epoch)
        micro_batches = self._next_micro_batches(batches)
        items = self._global_items(micro_batches, samples)
        scale = engine.loss_multiplier / items
        comm_before = engine.comm.snapshot()
        measure = self._measure_noise(samples)
        first_sq = None
        item_losses = []  # summed in float64 only when the iteration is logged (see _log)
        autocast = self._autocast
        for m, (inputs, targets) in enumerate(micro_batches):
            sync = m == k - 1
            with engine.sync_context(sync), autocast():
                losses = self.loss_fn(engine.model(inputs), targets)
                loss = losses.sum() * scale
            engine.backward(loss, sync)
            item_losses.append(losses.detach())
            if measure == "micro_batches" and m == 0:
                first_sq = float(engine.grad_norm()) ** 2
        grad_norm = self._clip_and_step()
        self.progress.advance(samples, items, k, plan.iterations_per_epoch)
        calls, rounds, nbytes = (a - b for a, b in zip(engine.comm.snapshot(), comm_before, strict=True))
        if measure:
            first_items = self.count_items(micro_batches[0]) if self.count_items else plan.micro_batch_size
            self._update_noise(measure, first_sq, grad_norm, first_items, items)
        return {"item_losses": item_losses, "items": items, "samples": samples, "grad_norm": grad_norm,
                "allreduces_per_iteration": calls, "allreduce_rounds_per_iteration": rounds,
                "allreduce_bytes_per_iteration": nbytes, "seconds": time.perf_counter() - t_start}

    def _measure_noise(self, samples: int) -> str | None:
        """How this iteration feeds the noise scale (full global batches only), or None.

        `ranks` (W ≥ 2, DDP): the comm hook's local (b·k samples) and all-reduced (B) squared norms.
        `micro_batches` (W = 1, k ≥ 2): the gradient after the first micro-step (b samples) against the whole
        batch's (B). Not with sync_every_micro_step and k > 1: local gradients then include synced parts.
        """
        state = getattr(self.engine, "hook_state", None)
        full = self.noise is not None and samples == self.plan.global_batch_size
        k = self.plan.grad_accum_steps
        by_ranks = (full and state is not None and self.env.is_distributed
                    and not (self.sync_every_micro_step and k > 1))
        if state is not None:
            state.measure_norms = by_ranks
            state.reset_norms()
        if by_ranks:
            return "ranks"
        return "micro_batches" if full and not self.env.is_distributed and k > 1 else None

    def _clip_and_step(self) -> float:
        engine, optim = self.engine, self.cfg.optim
        total_norm = engine.grad_norm()
        norm = float(total_norm)
        if not math.isfinite(norm):
            self._nonfinite(norm)
        elif optim.grad_clip is not None:
            engine.clip_grad(optim.grad_clip, total_norm=total_norm)  # reuse the norm: no second pass
            engine.step()
        else:
            engine.step()
        self.scheduler.step()
        engine.zero_grad()
        return norm

    def _nonfinite(self, norm: float) -> None:
        """Synced gradients are equal on every rank, so every rank takes the same decision here."""
        it = self.progress.iteration + 1
        if self.cfg.train.on_nonfinite == "skip":
            self.progress.skipped_iterations += 1
            self.reporter.warn(f"iteration {it}: non-finite gradient norm {norm}; skipped the update")
            return
        self.engine.zero_grad()
        self.save()
        raise TrainingStopped(f"non-finite gradient norm {norm} at iteration {it}; the last good state is "
                              f"checkpointed at iteration {it - 1} (set train.on_nonfinite=skip to skip such "
                              f"iterations)")

    def _update_noise(self, how: str, first_sq: float | None, grad_norm: float, first_items: int,
                      items: int) -> None:
        """Feed the estimator; an iteration with a non-finite norm (on_nonfinite=skip) is left out."""
        if how == "ranks":
            state = self.engine.hook_state  # every rank joins this all-reduce, finite or not
            small = all_reduce_sum([state.local_sq], self.env.device)[0] / self.env.world_size
            big, b_small, b_big = state.global_sq, self.plan.local_batch_size, self.plan.global_batch_size
        else:
            # the loss is divided by the iteration's items, so after micro-step 0 the gradient is
            # (first_items / items) · G_small
            small = first_sq * (items / first_items) ** 2
            big, b_small, b_big = grad_norm**2, first_items, items
        if math.isfinite(small) and math.isfinite(big):
            self.noise.update(small, big, b_small, b_big)

    # ---- logging, evaluation ---------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        stop = 1.0 if self.stop_flag.requested() else 0.0
        local_sum = float(torch.cat([x.reshape(-1) for x in row["item_losses"]]).double().sum())
        loss_sum, stop = all_reduce_sum([local_sum, stop], self.env.device)
        self._stop_votes, items = stop, row["items"]  # items is already the global count; one reduce for both
        now = time.perf_counter()
        window_seconds, self._window_start = now - self._window_start, now
        window_samples, self._window_samples = self.progress.samples_seen - self._window_samples, \
            self.progress.samples_seen
        p, plan = self.progress, self.plan
        metrics = {
            "iteration": p.iteration, "epoch": plan.epochs_for(p.iteration), "samples_seen": p.samples_seen,
            "tokens_seen": p.tokens_seen, "global_batch_size": plan.global_batch_size,
            "batch_samples": row["samples"], "local_batch_size": plan.local_batch_size,
            "micro_batch_size": plan.micro_batch_size, "world_size": plan.world_size,
            "grad_accum_steps": plan.grad_accum_steps, "lr": self.schedule.lr_at(p.iteration - 1),
            "loss": loss_sum / items, "grad_norm": row["grad_norm"],
            "allreduces_per_iteration": row["allreduces_per_iteration"],
            "allreduce_rounds_per_iteration": row["allreduce_rounds_per_iteration"],
            "allreduce_bytes_per_iteration": row["allreduce_bytes_per_iteration"],
            "samples_per_second": window_samples / window_seconds if window_seconds > 0 else None,
        }
        if self.noise is not None:
            metrics["grad_noise_scale"] = self.noise.noise_scale
        self.reporter.log(metrics)

    def _stop_requested(self, logged: bool) -> bool:
        """Did any rank get a stop request? Every iteration under SLURM (one tiny all-reduce), else when logging.

        All ranks take part in the same reductions, so they all stop after the same iteration.
        """
        if not logged and self.stop_flag.watched:
            requested = 1.0 if self.stop_flag.requested() else 0.0
            self._stop_votes = all_reduce_sum([requested], self.env.device)[0]
        return self._stop_votes > 0

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Exact evaluation: every sample on exactly one rank, sums reduced, then divided once."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        sampler = EvalSampler(len(self.eval_set), self.env.world_size, self.env.rank,
                              self.plan.micro_batch_size * 4)
        loader = DataLoader(self.eval_set, batch_sampler=sampler, collate_fn=self._collate())
        loss_sum, correct, count = 0.0, 0.0, 0.0
        for inputs, targets in (_to_device(b, self.env.device) for b in loader):
            outputs = model(inputs)
            loss_sum += float(self.loss_fn(outputs, targets).double().sum())
            if outputs.ndim == 2 and targets.ndim == 1:
                correct += float((outputs.argmax(dim=1) == targets).sum())
            count += len(targets)
        sums = reduce_metric_sums({"loss": loss_sum, "correct": correct, "count": count}, self.env.device)
        model.train(was_training)
        result = {"iteration": self.progress.iteration, "epoch": self.plan.epochs_for(self.progress.iteration),
                  "samples_seen": self.progress.samples_seen, "eval_loss": sums["loss"] / sums["count"],
                  "eval_accuracy": sums["correct"] / sums["count"], "eval_samples": int(sums["count"])}
        self.reporter.log_eval(result)
        return result

    # ---- checkpoints -----------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _fingerprint(self) -> dict:
        return {"global_batch_size": self.plan.global_batch_size, "dataset_size": self.plan.dataset_size,
                "seed": self.cfg.train.seed, "world_size": self.plan.world_size,
                "micro_batch_size": self.plan.micro_batch_size}

    def save(self) -> Path:
        """Checkpoint the current state (all ranks call this)."""
        main = self.env.is_main
        optimizer_state = self.engine.optimizer_state()  # every rank: a sharded (ZeRO) state is gathered
        state = None
        if main:
            state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                     "progress": self.progress.state_dict(),
                     "sampler": self.sampler.state_dict(iterations_done=self.progress.iteration_in_epoch),
                     "plan": self._fingerprint(),
                     "noise": self.noise.state_dict() if self.noise else None}
        return ckpt.save_checkpoint(self.checkpoint_dir, self.progress.iteration,
                                    model_state=self.engine.model_state() if main else None, state=state,
                                    rank=self.env.rank, barrier=self.engine.barrier,
                                    keep=self.cfg.train.keep_checkpoints)

    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume == "never":
            return None
        path = ckpt.find_latest(self.checkpoint_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        weights, state, rng = ckpt.load_checkpoint(path, self.env.rank)
        self._check_compatible(state["plan"], path)
        try:
            self.engine.load_model_state(weights)
        except RuntimeError as err:
            lines = str(err).splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model: {detail}") from None
        self.engine.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress.load_state_dict(state["progress"])
        self.sampler.load_state_dict(state["sampler"])
        if self.noise is not None and state.get("noise"):
            self.noise.load_state_dict(state["noise"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        return path

    def _check_compatible(self, old: dict, path: Path) -> None:
        """Refuse a different global batch, dataset size or seed (unless allowed); W and b may change."""
        new = self._fingerprint()
        changed = [f"{k} {old[k]} → {new[k]}" for k in ("global_batch_size", "dataset_size", "seed")
                   if old.get(k) != new[k]]
        if changed and not self.cfg.train.allow_config_change:
            raise ckpt.CheckpointError(f"checkpoint {path.name} was written with a different run: "
                                       f"{', '.join(changed)}; set train.allow_config_change=true to resume anyway")

    def _save_final(self) -> None:
        if self.env.is_main:
            from safetensors.torch import save_file

            final = self.run_dir / "final"
            final.mkdir(parents=True, exist_ok=True)
            tmp = final / ".model.safetensors.tmp"
            save_file({k: v.detach().contiguous().cpu() for k, v in self.engine.model_state().items()}, tmp)
            os.replace(tmp, final / "model.safetensors")
        self.engine.barrier()

    def _halt(self) -> None:
        """train.halt_at: checkpoint and return as if preempted, without requeueing (resume continues)."""
        path = self.save()
        self.reporter.warn(f"halted at iteration {self.progress.iteration} (train.halt_at); checkpoint "
                           f"{path.name}; run again with train.resume=auto to continue")
        self.summary = {"halted": True, "iteration": self.progress.iteration}

    def _preempt(self) -> None:
        """Checkpoint after the current iteration and return (exit code 0).

        Under SLURM the batch script requeues the job once the step has exited cleanly; the requeued job
        resumes from this checkpoint with train.resume=auto.
        """
        path = self.save()
        if self.env.is_main and self.stop_flag.watched:  # tells the batch script that a requeue has work to do
            self.stop_flag.file.write_text(f"checkpoint {path.name} at iteration {self.progress.iteration}\n")
        self.reporter.warn(f"stop requested ({self.stop_flag.signal or 'on another rank'}): checkpoint "
                           f"{path.name} written at iteration {self.progress.iteration}")
        self.summary = {"preempted": True, "iteration": self.progress.iteration}

    def _finish(self, seconds: float, last_eval: dict | None) -> None:
        p = self.progress
        self.summary = {
            "iterations": p.iteration, "epochs": self.plan.epochs_for(p.iteration), "samples_seen": p.samples_seen,
            "wall_seconds": seconds, "samples_per_second": p.samples_seen / seconds if seconds > 0 else None,
            "final_loss": self.reporter.last_loss, "allreduces_per_iteration":
                self.reporter.last_metrics.get("allreduces_per_iteration"),
            "allreduce_rounds_per_iteration": self.reporter.last_metrics.get("allreduce_rounds_per_iteration"),
            **({k: v for k, v in last_eval.items() if k.startswith("eval_")} if last_eval else {}),
        }
        self.reporter.finish(self.summary)
        if dist.is_initialized():
            dist.barrier()

    def _plan_info(self, resumed: Path | None) -> dict:
        info = {**self.plan.to_dict(), **self.lr_info(), "total_iterations": self.total_iterations,
                "epochs": self.plan.epochs_for(self.total_iterations),
                "total_samples": self.plan.samples_for(self.total_iterations),
                "warmup_iterations": self.schedule.warmup_iterations, "engine": self.engine.name,
                "backend": self.env.backend if self.env.is_distributed else "none",
                "launcher": self.env.describe_launcher(), "seed": self.cfg.train.seed}
        if resumed is not None:
            info["resumed_from"] = resumed.name
        return info


def train_from_config(cfg: Config, env: DistEnv | None = None, **trainer_kwargs) -> dict:
    """Build the configured data and model (seeded by train.seed) and train; returns the summary."""
    from ddp_toolkit.data import build_data
    from ddp_toolkit.models import build_model

    try:
        train_set, eval_set = build_data(cfg.data)
    except ValueError as err:  # a bad module:function
        raise ConfigError(str(err)) from None
    x0, _ = train_set[0]
    num_classes = int(getattr(train_set, "y", torch.tensor([cfg.data.classes - 1])).max()) + 1
    num_classes = max(num_classes, cfg.data.classes if cfg.data.name == "synthetic" else num_classes)
    torch.manual_seed(cfg.train.seed)
    try:
        model = build_model(cfg.model, int(x0.numel()), num_classes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.model.dtype == "float64":
        train_set = _cast(train_set, torch.float64)
        eval_set = _cast(eval_set, torch.float64) if eval_set is not None else None
    return Trainer(model, train_set, cfg, eval_set=eval_set, env=env, **trainer_kwargs).fit()


def _cast(data: Dataset, dtype: torch.dtype) -> Dataset:
    """Float features in the model's dtype (built-in TensorData only)."""
    from ddp_toolkit.data import TensorData

    return TensorData(data.x.to(dtype), data.y) if isinstance(data, TensorData) else data
