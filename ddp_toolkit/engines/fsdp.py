"""FSDP2 engine (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over W.

Grouping: each module whose class `train.fsdp.shard_modules` names becomes one FSDP group (one all-gather before
its forward, one reduce-scatter of its gradients); without names, every submodule holding at least
`train.fsdp.min_params` parameters not yet grouped (innermost first), then the root takes the rest.

Loss weighting: the reduce-scatter averages over W ranks, as DDP does, so the usual ×W multiplier gives the
exact global-batch mean gradient. Gradients are reduced on the last micro-step only
(`set_requires_gradient_sync`): the reduce-scatters per iteration are the number of groups, whatever k is.
Clipping and the non-finite check use the true global norm of the sharded gradients (a replicated tensor).
Checkpoints are sharded (DCP): every rank writes its own shard and a resume at another W reshards.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from ddp_toolkit.config import ConfigError, FSDPConfig
from ddp_toolkit.engines.base import CommStats, Engine

__all__ = ["FSDPEngine", "shard_groups"]

# optimizers whose update depends on the shape of each tensor (trust ratios): a shard would change them
PER_TENSOR_OPTIMIZERS = ("lars", "lamb")


class CountingAllGather(DefaultAllGather):
    """FSDP's own all-gather, counting calls and bytes received."""

    def __init__(self, comm: CommStats) -> None:
        self.comm = comm

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.comm.gathers += 1
        self.comm.gather_bytes += output_tensor.numel() * output_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, async_op)


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP's own gradient reduce-scatter, counting calls and bytes handed in."""

    def __init__(self, comm: CommStats) -> None:
        self.comm = comm

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.comm.calls += 1
        self.comm.bytes += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def shard_groups(model: nn.Module, class_names: list[str], min_params: int) -> list[nn.Module]:
    """The submodules to shard as their own groups, innermost first (the root is sharded after them)."""
    inner = list(model.modules())[1:]
    if class_names:
        chosen = [m for m in inner if type(m).__name__ in class_names]
        if not chosen:
            classes = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"train.fsdp.shard_modules {class_names} names no module class of this model; its "
                              f"classes are {', '.join(classes)}")
        return chosen[::-1]
    chosen, taken = [], set()
    for module in reversed(inner):  # reversed pre-order: every module after all of its descendants
        own = [p for p in module.parameters() if id(p) not in taken]
        if sum(p.numel() for p in own) >= min_params:
            chosen.append(module)
            taken.update(id(p) for p in own)
    return chosen


def _rebind(optimizer: torch.optim.Optimizer, new_params: dict[str, nn.Parameter],
            names: dict[int, str]) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, hyperparameters) over the sharded parameters that replaced the old."""
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [new_params[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    # only what the constructor takes: AdamW's defaults hold `decoupled_weight_decay`, which only Adam accepts
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def _bf16_supported(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


class FSDPEngine(Engine):
    """`fully_shard` on the chosen groups and the root; sharded checkpoints (see the module docstring)."""

    name = "fsdp"
    flops_countable = False  # a copy of a hooked/sharded module breaks it (ZeRO-3: ds_id)
    sharded_checkpoint = True

    def __init__(self, env, plan, cfg=None) -> None:
        super().__init__(env, plan, cfg)
        self.settings = cfg.train.fsdp if cfg is not None else FSDPConfig()
        if cfg is not None and cfg.optim.name in PER_TENSOR_OPTIMIZERS:
            raise ConfigError(f"optim.name {cfg.optim.name} computes per-tensor trust ratios, which a shard of "
                              f"each tensor would change; use train.engine=ddp or sgd/adam/adamw")
        self.mixed = self.precision == "bf16" and _bf16_supported(env.device)
        if self.precision == "bf16" and not self.mixed:
            warnings.warn(f"{env.device} has no bf16: the fsdp engine trains in fp32", stacklevel=2)
        self._own_group = False
        self._groups: list[tuple[nn.Module, bool]] = []

    # ---- setup ---------------------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        if not dist.is_initialized():  # one process: FSDP still shards over a mesh of one
            dist.init_process_group(self.env.backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._ensure_group()
        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      output_dtype=torch.float32) if self.mixed else MixedPrecisionPolicy()
        names = {id(p): n for n, p in model.named_parameters()}
        reshard = self.settings.reshard_after_forward
        for module in shard_groups(model, self.settings.shard_modules, self.settings.min_params):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
            self._groups.append((module, reshard))
        fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)  # needed first in backward
        self._groups.append((model, False))
        for module, _ in self._groups:
            module.set_custom_all_gather(CountingAllGather(self.comm))
            module.set_custom_reduce_scatter(CountingReduceScatter(self.comm))
        self.model, self.optimizer = model, _rebind(optimizer, dict(model.named_parameters()), names)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 comes from the mixed-precision policy (bf16 parameters in compute, fp32 reduction), not autocast."""
        return contextlib.nullcontext()

    # ---- one iteration -------------------------------------------------------------------------------
    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        calls = self.comm.calls
        loss.backward()
        if self.comm.calls > calls:
            self.comm.rounds += 1

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm over every rank's gradient shards, as a full (replicated) tensor: one all-reduce."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(grads)
        return total.full_tensor() if isinstance(total, DTensor) else total

    # ---- evaluation and state ------------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self):
        """Every group gathered once, then kept: forward passes inside need no collectives (ranks may differ)."""
        for module, _ in self._groups:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield self.model
        finally:
            for module, reshard in self._groups:
                module.reshard()
                module.set_reshard_after_forward(reshard, recurse=False)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full weights on rank 0 (CPU), {} elsewhere; a collective call on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Full weights (every rank holds them, e.g. a ddp checkpoint): each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self) -> dict:
        """The full optimizer state keyed by parameter name (rank 0, CPU); a collective call on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, state: dict) -> None:
        """torch's per-parameter format (ids in parameter order, e.g. a ddp checkpoint) or keyed by name."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = [n for n, _ in self.model.named_parameters()]
        groups = state["param_groups"]
        if any(isinstance(i, int) for g in groups for i in g["params"]):
            state = {"state": {names[int(i)]: v for i, v in state["state"].items()},
                     "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups]}
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False
