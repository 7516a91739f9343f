"""RNG states of one rank — torch, this rank's CUDA device, numpy, python — saved with every checkpoint so a
resume draws the same random numbers (dropout, augmentation) as the run it continues."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict:
    """torch, CUDA, numpy and python RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": [kind, int(pos), int(has_gauss), float(cached)], "python": random.getstate()}
    if torch.cuda.is_available():  # this rank's device only: a resume may see fewer GPUs (#22)
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _set_cuda_rng_state(state: dict) -> None:
    """This rank's CUDA generator; an older checkpoint's list of every visible GPU gives the current device's
    entry when there is one (a resume that sees fewer GPUs skips it rather than fail)."""
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and device < len(state["cuda"]):
        torch.cuda.set_rng_state(state["cuda"][device], device)


def set_rng_state(state: dict) -> None:
    """Restore the states saved by `rng_state`; a state of another shape is a CheckpointError."""
    try:
        torch.set_rng_state(state["torch"])
        kind, pos, has_gauss, cached = state["numpy_rest"]
        np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        _set_cuda_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        from ddp_toolkit.checkpoint import CheckpointError

        raise CheckpointError(f"the saved RNG state has the wrong shape ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


