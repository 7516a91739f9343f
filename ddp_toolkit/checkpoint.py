"""Atomic checkpoints with everything a bit-exact resume needs.

Layout of `run_dir/checkpoints/`:
  it00000040/model.safetensors   weights (safetensors: no code runs on load)
  it00000040/state.pt            optimizer, scheduler, progress, sampler, plan (torch.load(weights_only=True))
  it00000040/rng-rank{r}.pt      RNG states of every rank
  it00000040/manifest.json       size and sha256 of every file, written last inside the directory
  latest                         name of the newest complete checkpoint, replaced last

A checkpoint is written under a temporary name, every file fsync'd, then renamed; `latest` moves after the
rename. A crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ddp_toolkit.errors import EXIT_INPUT, ToolkitError

__all__ = ["CheckpointError", "save_checkpoint", "find_latest", "load_checkpoint", "rng_state",
           "set_rng_state"]

MANIFEST = "manifest.json"


class CheckpointError(ToolkitError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    exit_code = EXIT_INPUT


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    """torch, CUDA, numpy and python RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [kind, int(pos), int(has_gauss), float(cached)], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_manifest(tmp: Path, iteration: int) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())
             if p.name != MANIFEST}
    path = tmp / MANIFEST
    path.write_text(json.dumps({"iteration": iteration, "files": files}, indent=1))
    _fsync_file(path)


def _point_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def save_checkpoint(root: Path, iteration: int, *, model_state: dict | None, state: dict | None,
                    rank: int, barrier: Callable[[], None], keep: int = 2) -> Path:
    """Write checkpoint `it{iteration}` atomically. Every rank calls it; rank 0 writes the shared files.

    `model_state`/`state` are only needed on rank 0; every rank writes its own RNG state.
    """
    root = Path(root)
    name = f"it{iteration:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _fsync_file(tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        for f in ("model.safetensors", "state.pt"):
            _fsync_file(tmp / f)
    barrier()
    if rank == 0:
        _write_manifest(tmp, iteration)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _point_latest(root, name)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for old in sorted(root.glob("it*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None if the checkpoint directory is complete and undamaged, else what is wrong with it."""
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{manifest} is missing or unreadable"
    for fname, meta in files.items():
        f = path / fname
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            return f"{f} is damaged (size or sha256 differs from the manifest)"
    return None


def find_latest(root: Path) -> Path | None:
    """The newest undamaged checkpoint under root; each damaged newer one is named in a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("it*") if p.is_dir()), reverse=True)
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path.name}: {problem}", stacklevel=2)
    return None


def _load_pt(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for crafted files, RuntimeError for torn ones
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing to load {path}: {first}") from None


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict, dict | None]:
    """(model weights, shared state, this rank's RNG state or None when the rank did not exist then)."""
    path = Path(path)
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    try:
        weights = load_file(path / "model.safetensors")
    except Exception as err:
        raise CheckpointError(f"refusing to load {path / 'model.safetensors'}: {err}") from None
    state = _load_pt(path / "state.pt")
    rng_file = path / f"rng-rank{rank}.pt"
    return weights, state, _load_pt(rng_file) if rng_file.exists() else None
