"""ZeRO-3 state ⇄ torch's per-parameter format, one parameter at a time (never the whole model on one device).

ZeRO-3 partitions every parameter over the ranks; the fp32 master copy and the optimizer moments live in flat
per-subgroup partitions of the torch optimizer. DeepSpeed's `safe_get_full_*` / `safe_set_full_*` gather or set
one parameter's full tensor; the weights of the module itself (the partitions used in forward) are set through
`GatheredParameters`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["gather_zero3_state", "load_zero3_weights", "scatter_zero3_state"]


def _flat_state(base: torch.optim.Optimizer, flats: list[torch.Tensor]) -> dict:
    """The optimizer state of the first flat fp32 partition (all subgroups hold the same keys). ZeRO-3 empties the
    optimizer's param_groups between steps, so the partitions come from DeepSpeed (`fp32_partitioned_groups_flat`)."""
    return next((base.state[flat] for flat in flats if base.state.get(flat)), {})


def _tensor_keys(base: torch.optim.Optimizer, flats: list[torch.Tensor]) -> list[str]:
    state = next(((flat, base.state[flat]) for flat in flats if base.state.get(flat)), None)
    return [] if state is None else sorted(k for k, v in state[1].items()
                                           if torch.is_tensor(v) and v.shape == state[0].shape)


def gather_zero3_state(base: torch.optim.Optimizer, flats: list[torch.Tensor], groups: list[list[nn.Parameter]],
                       rank: int) -> dict:
    """Full per-parameter optimizer state on rank 0 (CPU); a collective call on every rank."""
    from deepspeed.utils import safe_get_full_optimizer_state

    keys, flat_state = _tensor_keys(base, flats), _flat_state(base, flats)
    scalars = {k: v for k, v in flat_state.items() if k not in keys}
    state, param_groups, index = {}, [], 0
    for params in groups:
        for i, p in enumerate(params):
            full = {key: safe_get_full_optimizer_state(p, key) for key in keys}
            if rank == 0 and flat_state:
                entry = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in scalars.items()}
                entry.update({key: value.detach().reshape(p.ds_shape).cpu().clone() for key, value in full.items()})
                state[index + i] = entry
        hyper = {k: v for k, v in base.param_groups[0].items() if k != "params"}
        param_groups.append({**hyper, "params": list(range(index, index + len(params)))})
        index += len(params)
    return {"state": state, "param_groups": param_groups}


def scatter_zero3_state(base: torch.optim.Optimizer, flats: list[torch.Tensor], groups: list[list[nn.Parameter]],
                        saved: dict) -> None:
    """Load torch's per-parameter format: each rank keeps its partition of every tensor."""
    from deepspeed.utils import safe_set_full_optimizer_state

    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(params) for params in groups]:
        raise ValueError(f"optimizer state has param groups of sizes {sizes}, this model "
                         f"{[len(params) for params in groups]}")
    saved_state = {int(k): v for k, v in saved["state"].items()}
    hyper = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    for group in base.param_groups:
        group.update(hyper)
    for params, saved_group in zip(groups, saved["param_groups"], strict=True):
        for p, pid in zip(params, saved_group["params"], strict=True):
            entry = saved_state.get(int(pid)) or {}
            for key, value in entry.items():
                if torch.is_tensor(value) and value.ndim > 0 and value.numel() == p.ds_numel:
                    for flat in flats:  # a fresh optimizer (SGD before its first step) has no state yet
                        if getattr(base.state[flat].get(key), "shape", None) != flat.shape:
                            base.state[flat][key] = torch.zeros_like(flat)
                    safe_set_full_optimizer_state(p, value.to(p.ds_tensor.device, torch.float32).reshape(-1), key)
                else:  # per-step scalars (Adam's step) are the same for every parameter and subgroup
                    for flat in flats:
                        base.state[flat][key] = value.clone() if torch.is_tensor(value) else value


def load_zero3_weights(module: nn.Module, state: dict[str, torch.Tensor], rank: int) -> None:
    """Full weights (every rank holds them): the module's partitions and the fp32 master partitions."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    names = dict(module.named_parameters())
    missing = sorted(set(names) - set(state))
    if missing:
        raise RuntimeError(f"weights do not fit this model\nmissing keys: {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, p in names.items():
            value = state[name]
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(value.reshape(p.shape))
            safe_set_full_fp32_param(p, value.to(p.ds_tensor.device, torch.float32))
        buffers = {k: v for k, v in state.items() if k not in names}
        module.load_state_dict(buffers, strict=False)
