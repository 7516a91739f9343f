"""One small interface for the gradient-sync engines: prepare, micro-step with or without sync, step, state."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ddp_toolkit.dist import DistEnv
from ddp_toolkit.plan import BatchPlan


@dataclass
class CommStats:
    """Gradient reduction traffic measured by the engine (a DDP comm hook, FSDP's counting collectives, DeepSpeed's
    backend): all-reduces, or reduce-scatters for the sharded engines; `snapshot` is what the metrics report."""

    calls: int = 0
    """All-reduce calls (one per DDP bucket per synced backward)."""
    rounds: int = 0
    """Synced backward passes: gradient all-reduce rounds (bucket 0 seen once per round)."""
    bytes: int = 0
    """Bytes handed to all-reduce."""
    gathers: int = 0
    """Parameter all-gathers (sharded engines: before each group's forward, and its backward when resharded)."""
    gather_bytes: int = 0
    """Bytes received by those all-gathers."""

    def snapshot(self) -> tuple[int, int, int, int, int]:
        return self.calls, self.rounds, self.bytes, self.gathers, self.gather_bytes


class Engine(ABC):
    """Owns the wrapped model and optimizer and decides when gradients are synchronised."""

    name = "base"

    def __init__(self, env: DistEnv, plan: BatchPlan, cfg=None) -> None:
        self.env, self.plan = env, plan
        self.precision = cfg.train.precision if cfg is not None else "fp32"
        self.comm = CommStats()
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap model and optimizer for data-parallel training."""

    @property
    def module(self) -> nn.Module:
        """The bare model (no wrapper): for evaluation and checkpoints."""
        return getattr(self.model, "module", self.model)

    @property
    def loss_multiplier(self) -> float:
        """Factor on Σ(item losses)/global_items that makes the synced gradient the global-batch mean.

        DDP averages gradients over W ranks, so the default undoes that with ×W.
        """
        return float(self.env.world_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision context; the engine is its one owner (bf16 autocast or nothing)."""
        if self.precision == "bf16":
            return torch.autocast(self.env.device.type, torch.bfloat16)
        return contextlib.nullcontext()

    # ---- gradient norms for the noise scale: the local (before sync) and global (after) squared norms
    supports_norm_measurement = False
    """True when the engine can measure both norms during its own gradient sync at no extra communication."""

    def measure_norms(self, enabled: bool) -> None:  # noqa: B027 - engines without the measurement ignore it
        """Measure (or not) the squared gradient norms during the next synced backward."""

    def measured_norms(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(|local gradient|², |synced gradient|²) of the last synced backward as device tensors (not read), or
        None when not measured."""
        return None

    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradient sync only when `sync`."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (synced) gradient."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        first = grads[0]
        if all(g.device == first.device and g.dtype == first.dtype for g in grads):
            # the usual case, one fused kernel: get_total_norm first regroups by (device, dtype) in Python
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return torch.nn.utils.get_total_norm(grads)

    def clip_grad(self, max_norm: float, total_norm: torch.Tensor | None = None) -> None:
        """Scale gradients to norm ≤ max_norm; `total_norm` (from grad_norm) saves computing it again."""
        if total_norm is None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), max_norm, total_norm)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def optimizer_state(self) -> dict:
        """torch's optimizer state_dict format; called on every rank (a sharded engine gathers), rank 0 saves it."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # ---- sharded checkpoints (torch.distributed.checkpoint): every rank writes its own shard ----------------
    sharded_checkpoint = False
    flops_countable = True
    """The FLOP count may run a meta-device copy of `module` (not for engines that hook or shard the module)."""
    batch_size_may_change = True
    """Whether k may change between iterations (a batch-size schedule); DeepSpeed fixes it when it starts."""
    """True when checkpoints are written with DCP (`sharded_state`), one shard per rank; else rank 0 writes the
    full model and optimizer state."""

    def sharded_state(self) -> dict:
        """{"model": ..., "optim": ...} keyed by parameter name (DTensors for a sharded model), for `dcp.save`."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_sharded_state(self, path) -> None:
        """Load a DCP checkpoint written at any world size (DCP reshards to this engine's layout)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.sharded_state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @contextlib.contextmanager
    def evaluation(self):
        """The model to evaluate; ranks may run different numbers of forward passes inside (no collectives)."""
        yield self.module

    def barrier(self) -> None:
        if self.env.is_distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release engine resources (hooks, wrappers)."""

