"""`ddp-toolkit export`: a checkpoint (sharded or not) as one safetensors file that loads into the plain model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddp_toolkit.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    _fsync_file,
    find_latest,
    is_sharded,
    verify,
)
from ddp_toolkit.rundir import describe_os_error

__all__ = ["export_weights", "full_weights"]


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint, a sharded one's shards joined in this process (no process group)."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    if not is_sharded(path):
        return load_file(path / "model.safetensors")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys={"model"}),
                     no_dist=True)
    return state["model"]


def export_weights(source: Path, out: Path | None = None) -> tuple[Path, Path]:
    """Write the newest valid checkpoint of run directory `source` (or checkpoint directory `source`) as one
    safetensors file, by atomic replace; (checkpoint used, file written). Default: RUN_DIR/export/model.safetensors."""
    source = Path(source)
    if (source / MANIFEST).exists():
        path, run_dir = source, source.parent.parent
    else:
        path, run_dir = find_latest(source / "checkpoints"), source
        if path is None:
            raise CheckpointError(f"{source} holds no valid checkpoint (looked in {source / 'checkpoints'})")
    out = Path(out) if out is not None else run_dir / "export" / "model.safetensors"
    weights = {k: v.detach().contiguous().cpu() for k, v in full_weights(path).items()}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(weights, tmp, metadata={"checkpoint": path.name})
        _fsync_file(tmp)
        os.replace(tmp, out)
    except OSError as err:
        raise CheckpointWriteError(f"cannot write {out}: {describe_os_error(err)}") from None
    return path, out
