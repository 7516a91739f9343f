"""DeepSpeed engine (ZeRO stage 0, 1, 2 or 3) driven by our loop, our sampler and our batch plan.

The DeepSpeed config is derived from the plan (train_batch_size = B, train_micro_batch_size_per_gpu = b,
gradient_accumulation_steps = k, ZeRO stage, gradient clipping); a user JSON (`train.deepspeed_config`) is
merged in but must agree with the plan, else one ConfigError line names both sides.

Loss weighting: `backward(loss, scale_wrt_gas=False)` stops DeepSpeed from dividing by k, and its gradient
reduction averages over W, so the usual ×W multiplier gives the global-batch mean gradient. The accumulation
boundary is set explicitly from the trainer's `sync` flag, so DeepSpeed's micro-step counter never has to
agree with ours (e.g. after a resume). Gradient reductions are counted by wrapping the reduce collectives of
DeepSpeed's communication backend while a backward runs: ZeRO 0/1 reduce once per iteration, ZeRO-2
reduce-scatters on every micro-step (its design: it cannot skip the sync), which the counters then show; so
does ZeRO-3, which also partitions the parameters (gathered per module in forward and backward).

Checkpoints stay in torch's per-parameter format, gathered to rank 0 in chunks on the CPU (ZeRO-3: one parameter
at a time), so they load at any world size and any stage; the fsdp engine's sharded checkpoints are refused.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddp_toolkit.config import ConfigError
from ddp_toolkit.engines.base import CommStats, Engine
from ddp_toolkit.engines.zero3 import gather_zero3_state, load_zero3_weights, scatter_zero3_state
from ddp_toolkit.plan import BatchPlan

__all__ = ["DeepSpeedConfigError", "DeepSpeedEngine", "deepspeed_config", "load_user_config"]

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# the reduce collectives of DeepSpeed's backend: position and name of the argument holding the data sent
REDUCE_OPS = {"all_reduce": (0, "tensor"), "inference_all_reduce": (0, "tensor"),
              "all_reduce_coalesced": (0, "tensors"), "reduce": (0, "tensor"),
              "reduce_scatter": (1, "input_list"), "reduce_scatter_tensor": (1, "input_tensor")}
# optimizers whose update depends on the shape of each tensor (trust ratios): ZeRO flattens tensors
PER_TENSOR_OPTIMIZERS = ("lars", "lamb")
CHUNK_ELEMENTS = 1 << 24
"""Optimizer state gathered to rank 0 this many elements (per state key) at a time."""


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed config that disagrees with the run (batch plan, optimizer, precision); one line."""


def load_user_config(path: str | None) -> tuple[dict, str]:
    """The user's DeepSpeed JSON (empty without one) and how to name it in messages."""
    if not path:
        return {}, "(derived)"
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as err:
        raise DeepSpeedConfigError(f"cannot read train.deepspeed_config {path!r}: {err.strerror}") from None
    except ValueError as err:
        raise DeepSpeedConfigError(f"train.deepspeed_config {path!r} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise DeepSpeedConfigError(f"train.deepspeed_config {path!r} must hold a JSON object")
    return raw, repr(path)


def _given(value) -> bool:
    return value is not None and value != "auto"


def check_batch_keys(user: dict, plan: BatchPlan, source: str) -> None:
    """Every batch number the user's JSON gives must be the plan's; one line names both sides."""
    b, k, w, big_b = plan.micro_batch_size, plan.grad_accum_steps, plan.world_size, plan.global_batch_size
    want = dict(zip(BATCH_KEYS, (big_b, b, k), strict=True))
    symbol = {"train_batch_size": f"b={b} × k={k} × W={w} = {big_b}", "train_micro_batch_size_per_gpu": f"b={b}",
              "gradient_accumulation_steps": f"k={k}"}
    wrong = [f"{key} {user[key]!r} vs plan {symbol[key]}" for key in BATCH_KEYS
             if _given(user.get(key)) and (isinstance(user[key], bool) or user[key] != want[key])]
    if wrong:
        raise DeepSpeedConfigError(
            f"DeepSpeed config {source} does not match the batch plan: {'; '.join(wrong)} (set "
            f"{', '.join(f'{key} {want[key]}' for key in BATCH_KEYS)}, or leave them out: the plan fills them in)")


def _zero_stage(user: dict, train, source: str) -> int:
    user_stage = (user.get("zero_optimization") or {}).get("stage")
    explicit = "zero_stage" in train.model_fields_set
    if _given(user_stage) and explicit and user_stage != train.zero_stage:
        raise DeepSpeedConfigError(f"DeepSpeed config {source} has zero_optimization.stage {user_stage} but "
                                   f"train.zero_stage is {train.zero_stage}; make them agree or drop one")
    stage = user_stage if _given(user_stage) and not explicit else train.zero_stage
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"ZeRO stage {stage!r} is not supported by the deepspeed engine; use 0, 1, 2 "
                                   f"or 3")
    return stage


def _check_other_keys(user: dict, cfg, source: str) -> None:
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise DeepSpeedConfigError(f"DeepSpeed config {source} has a {key!r} section; remove it: the "
                                       f"optimizer and the lr schedule come from optim.* (one schedule, stepped "
                                       f"once per iteration)")
    for key in ("fp16", "bf16"):
        if (user.get(key) or {}).get("enabled") in (True, "auto"):
            raise DeepSpeedConfigError(f"DeepSpeed config {source} enables {key}, which is not supported by the "
                                       f"deepspeed engine; remove it and use train.precision=bf16 (autocast, "
                                       f"fp32 weights)")
    for key in ("offload_optimizer", "offload_param"):
        device = ((user.get("zero_optimization") or {}).get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise DeepSpeedConfigError(f"DeepSpeed config {source} sets zero_optimization.{key}.device {device!r}, "
                                       f"which the deepspeed engine does not support (its CPU tensors would need "
                                       f"a gloo path next to nccl); remove it, or use train.engine=fsdp")
    clip = user.get("gradient_clipping")
    if _given(clip) and clip != 0 and clip != cfg.optim.grad_clip:
        raise DeepSpeedConfigError(f"DeepSpeed config {source} has gradient_clipping {clip} but optim.grad_clip "
                                   f"is {cfg.optim.grad_clip}; set optim.grad_clip={clip} or drop it from the JSON")


def deepspeed_config(plan: BatchPlan, cfg, user: dict | None = None, source: str = "(derived)") -> dict:
    """The DeepSpeed config of this run: the user's JSON, checked against the plan, with the plan filled in."""
    user = dict(user or {})
    check_batch_keys(user, plan, source)
    _check_other_keys(user, cfg, source)
    stage = _zero_stage(user, cfg.train, source)
    if stage and cfg.optim.name in PER_TENSOR_OPTIMIZERS:
        raise DeepSpeedConfigError(f"optim.name {cfg.optim.name} computes per-tensor trust ratios, which ZeRO "
                                   f"stage {stage}'s flattened partitions would change; use train.zero_stage=0 "
                                   f"or sgd/adam/adamw")
    out = copy.deepcopy(user)
    out.update(train_batch_size=plan.global_batch_size, train_micro_batch_size_per_gpu=plan.micro_batch_size,
               gradient_accumulation_steps=plan.grad_accum_steps, gradient_clipping=cfg.optim.grad_clip or 0.0)
    out["zero_optimization"] = {**(user.get("zero_optimization") or {}), "stage": stage}
    out.setdefault("zero_allow_untested_optimizer", True)  # torch's SGD/AdamW are "untested" for ZeRO
    out.setdefault("steps_per_print", 2**31 - 1)  # our reporter prints progress
    return out


class _ReductionCounter:
    """Counts the reduce collectives DeepSpeed's backend issues while `active` (during our backward calls)."""

    def __init__(self, comm: CommStats) -> None:
        self.comm, self.active, self._backend, self._names = comm, False, None, []

    def install(self) -> None:
        import deepspeed.comm.comm as ds_comm

        self._backend = ds_comm.cdb
        for name, arg in REDUCE_OPS.items():
            original = getattr(self._backend, name, None)
            if callable(original):
                setattr(self._backend, name, self._counting(original, arg))
                self._names.append(name)

    def _counting(self, fn, arg: tuple[int, str]):
        position, keyword = arg

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active:
                data = args[position] if len(args) > position else kwargs.get(keyword)
                tensors = data if isinstance(data, (list, tuple)) else [data]
                self.comm.calls += 1
                self.comm.bytes += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
            return fn(*args, **kwargs)

        return counted

    def uninstall(self) -> None:
        for name in self._names:
            with contextlib.suppress(AttributeError):
                delattr(self._backend, name)  # the instance attribute hid the class's method
        self._names = []


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` on our model and optimizer with a config derived from the plan."""

    name = "deepspeed"
    flops_countable = False  # a copy of a hooked/sharded module breaks it (ZeRO-3: ds_id)
    batch_size_may_change = False  # train_batch_size and gradient_accumulation_steps are fixed at initialize

    def __init__(self, env, plan, cfg) -> None:
        super().__init__(env, plan, cfg)
        user, source = load_user_config(cfg.train.deepspeed_config)
        self.ds_config = deepspeed_config(plan, cfg, user, source)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.ds = None
        self._counter = _ReductionCounter(self.comm)
        self._stepped = True
        self._own_group = False
        self._env_before: dict[str, str | None] = {}

    # ---- setup ---------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import deepspeed

        if self.zero_stage and any(p.dtype == torch.float64 for p in model.parameters()):
            raise DeepSpeedConfigError(f"model.dtype float64 with ZeRO stage {self.zero_stage}: DeepSpeed keeps "
                                       f"float32 master weights, so the run would silently lose precision; use "
                                       f"model.dtype=float32 or train.zero_stage=0")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed reads the rank from the environment (a process not started by a launcher has none) and picks
        # its GPU from LOCAL_RANK: one device decision, the toolkit's (DistEnv.device, already set as current)
        device = self.env.device
        for name, value in (("LOCAL_RANK", device.index if device.type == "cuda" else self.env.local_rank),
                            ("RANK", self.env.rank), ("WORLD_SIZE", self.env.world_size)):
            self._env_before.setdefault(name, os.environ.get(name))  # put back by close()
            if name == "LOCAL_RANK" and device.type == "cuda":
                os.environ[name] = str(value)
            else:
                os.environ.setdefault(name, str(value))
        if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
            # an in-process store: under torchrun a tcp:// or env:// init would look for the agent's store;
            # the environment's backend (nccl for CUDA tensors, gloo on CPU)
            dist.init_process_group(self.env.backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        self.ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.model = self.ds
        # the torch optimizer that holds the lr: the trainer's LambdaLR drives it, DeepSpeed gets no scheduler
        self.optimizer = ds_optimizer.optimizer if self.zero_stage else ds_optimizer
        self._counter.install()

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    # ---- one iteration -------------------------------------------------------------------------------
    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        self.ds.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        calls = self.comm.calls
        self._counter.active = True
        try:
            self.ds.backward(loss, scale_wrt_gas=False)  # our loss is already weighted for the global batch
        finally:
            self._counter.active = False
        if self.comm.calls > calls:
            self.comm.rounds += 1
        self._stepped = False

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradient (ZeRO: over every rank's partition), inf if not finite."""
        if not self.zero_stage:
            return super().grad_norm()
        optimizer = self.ds.optimizer
        if self.zero_stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            scaled = combine_grad_norm_groups(optimizer._get_norm_groups())
        else:
            scaled = optimizer.scaled_global_norm()
        norm = torch.as_tensor(scaled, dtype=torch.float64) / optimizer.loss_scale
        return norm if bool(torch.isfinite(norm)) and norm >= 0 else torch.tensor(float("inf"))  # -1 flags inf

    def clip_grad(self, max_norm: float, total_norm: torch.Tensor | None = None) -> None:
        """Nothing to do here: DeepSpeed clips inside step() (gradient_clipping = optim.grad_clip), same formula."""

    def step(self) -> None:
        self.ds.step()
        self._stepped = True

    def zero_grad(self) -> None:
        if not self._stepped and self.zero_stage:
            # the trainer skipped the update (non-finite norm): DeepSpeed's step sees the same invalid norm,
            # skips the update and discards its partitioned gradients
            self.ds.set_gradient_accumulation_boundary(True)
            self.ds.step()
            self._stepped = True
        self.ds.zero_grad()

    # ---- evaluation and state -----------------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation(self):
        """ZeRO-3: every parameter gathered for the whole pass (ranks may run different numbers of batches)."""
        if self.zero_stage != 3:
            yield self.module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            yield self.module

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full weights; ZeRO-3 gathers them one module at a time to rank 0 (a collective call)."""
        if self.zero_stage == 3:
            return self.ds._zero3_consolidated_16bit_state_dict()
        return self.ds.module.state_dict()  # ZeRO 1/2 keep full parameters on every rank

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.zero_stage == 3:
            return load_zero3_weights(self.ds.module, state, self.env.rank)
        self.ds.module.load_state_dict(state)
        if self.zero_stage:
            from deepspeed.utils import safe_set_full_fp32_param

            with torch.no_grad():
                for p in self.ds.module.parameters():
                    safe_set_full_fp32_param(p, p.detach())  # the fp32 master partitions follow the weights

    def optimizer_state(self) -> dict:
        """torch's per-parameter format (same as the ddp engine), complete on rank 0; a collective call with ZeRO."""
        if not self.zero_stage:
            return self.optimizer.state_dict()
        if self.zero_stage == 3:
            return gather_zero3_state(self.optimizer, self.ds.optimizer.fp32_partitioned_groups_flat,
                                      self.ds.optimizer.fp16_groups, self.env.rank)
        return gather_zero_state(self.optimizer, self.ds.optimizer.bit16_groups, self.ds.optimizer.dp_process_group,
                                 self.env.rank)

    def load_optimizer_state(self, state: dict) -> None:
        if not self.zero_stage:
            self.optimizer.load_state_dict(state)
        elif self.zero_stage == 3:
            scatter_zero3_state(self.optimizer, self.ds.optimizer.fp32_partitioned_groups_flat,
                                self.ds.optimizer.fp16_groups, state)
        else:
            scatter_zero_state(self.optimizer, self.ds.optimizer.bit16_groups, state)

    def load_sharded_state(self, path) -> None:
        from ddp_toolkit.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint {path} is sharded (written by the fsdp engine); the deepspeed engine "
                              f"cannot load it: resume with train.engine=fsdp, or export it (ddp-toolkit export)")

    def close(self) -> None:
        self._counter.uninstall()
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False
        _forget_deepspeed_groups()  # the next engine in this process must not reuse a group that is gone
        for name, value in self._env_before.items():  # an in-process run leaves no rank variables behind
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._env_before.clear()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in module globals; once the run's group is destroyed they point at a
    dead group, and a second engine in the same process (a sweep, a test) fails with "group is not registered"."""
    from deepspeed.utils import groups

    for name, value in vars(groups).copy().items():
        if name.startswith("_") and name[1:2].isupper() and name.endswith(("_GROUP", "_RANKS", "_RANK", "_SIZE")):
            if isinstance(value, dict):
                value.clear()
            elif value is not None:
                setattr(groups, name, None)


# ---- ZeRO optimizer state ⇄ torch's per-parameter format ------------------------------------------------
# ZeRO 1/2 give the torch optimizer one flat fp32 partition per param group and rank; DeepSpeed links each
# model parameter to its fragment of that partition (`_hp_mapping`: where the fragment sits in the parameter
# and in the partition; parameters outside this rank's partition have none).


def _fragment_keys(flat: torch.Tensor, flat_state: dict) -> list[str]:
    return sorted(k for k, v in flat_state.items() if torch.is_tensor(v) and v.shape == flat.shape)


def _chunks(params: list[nn.Parameter], limit: int = CHUNK_ELEMENTS) -> list[list[int]]:
    """Indices of consecutive parameters, at most `limit` elements per chunk (a bigger parameter alone)."""
    chunks, size = [[]], 0
    for i, p in enumerate(params):
        if chunks[-1] and size + p.numel() > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += p.numel()
    return [c for c in chunks if c]


def gather_zero_state(base: torch.optim.Optimizer, groups: list[list[nn.Parameter]], group=None, rank: int = 0) -> dict:
    """Every rank's fragments assembled into full per-parameter CPU tensors on rank 0 (call on every rank).

    Chunk by chunk: each chunk is reduced to rank 0 (every element is owned by exactly one rank, the others add
    0) and moved to the CPU there, so no rank ever holds the full fp32 moments on its device."""
    state, param_groups, index = {}, [], 0
    for gi, params in enumerate(groups):
        flat = base.param_groups[gi]["params"][0]
        flat_state = base.state.get(flat, {})
        keys = _fragment_keys(flat, flat_state)
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        for chunk in _chunks(params):
            lo = offsets[chunk[0]]
            part = torch.zeros(len(keys), offsets[chunk[-1] + 1] - lo, dtype=flat.dtype, device=flat.device)
            for i in chunk:
                mapping = getattr(params[i], "_hp_mapping", None)
                if mapping is not None:
                    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                    start = offsets[i] - lo + lp.start
                    for j, key in enumerate(keys):
                        part[j, start:start + lp.numel] = flat_state[key][hp.start:hp.start + hp.numel]
            if keys and dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.reduce(part, dst=0, group=group)
            if rank == 0 and flat_state:
                part = part.cpu()
                for i in chunk:
                    entry = {k: _cpu(v) for k, v in flat_state.items() if k not in keys}
                    entry.update({key: part[j, offsets[i] - lo:offsets[i + 1] - lo].view_as(params[i]).clone()
                                  for j, key in enumerate(keys)})
                    state[index + i] = entry
        param_groups.append({**{k: v for k, v in base.param_groups[gi].items() if k != "params"},
                             "params": list(range(index, index + len(params)))})
        index += len(params)
    return {"state": state, "param_groups": param_groups}


def _cpu(value):
    return value.detach().cpu().clone() if torch.is_tensor(value) else value


def scatter_zero_state(base: torch.optim.Optimizer, groups: list[list[nn.Parameter]], saved: dict) -> None:
    """Load torch's per-parameter format: each rank keeps the fragments of its own partition."""
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(params) for params in groups]:
        raise ValueError(f"optimizer state has param groups of sizes {sizes}, this model "
                         f"{[len(params) for params in groups]}")
    saved_state = {int(k): v for k, v in saved["state"].items()}
    for gi, (params, saved_group) in enumerate(zip(groups, saved["param_groups"], strict=True)):
        base.param_groups[gi].update({k: v for k, v in saved_group.items() if k != "params"})
        entries = [saved_state.get(int(i)) for i in saved_group["params"]]
        if not any(entries):
            continue
        flat = base.param_groups[gi]["params"][0]
        flat_state = base.state[flat]
        first = next(e for e in entries if e)
        for key, value in first.items():
            if torch.is_tensor(value) and value.shape == params[entries.index(first)].shape:
                target = flat_state.get(key)
                if target is None or target.shape != flat.shape:
                    target = flat_state[key] = torch.zeros_like(flat)
                for p, entry in zip(params, entries, strict=True):
                    mapping = getattr(p, "_hp_mapping", None)
                    if mapping is not None and entry:
                        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                        target[hp.start:hp.start + hp.numel].copy_(entry[key].reshape(-1)[lp.start:lp.start + lp.numel])
            else:  # per-step scalars (Adam's step) are the same for every parameter
                flat_state[key] = value.clone().to(flat.device) if torch.is_tensor(value) else value
