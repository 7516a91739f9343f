"""The checkpoint manager: it is handed the stateful parts of a run and decides when to save them.

Every part has `state_dict()` / `load_state_dict(state)`; adding a part means adding it to the `states`
mapping, never editing a save function and a load function in step (torchtitan's CheckpointManager shape).
The model and optimizer go through the engine (`EngineState`): a sharded engine (`engine.sharded_checkpoint`)
hands every rank's shard to torch.distributed.checkpoint and loads any world size's shards back (resharding);
the others are gathered and written by rank 0. The RNG goes through `RNGState` (every rank keeps its own).
Files, atomicity and verification are `checkpoint.py`'s job.

A checkpoint records the run's fingerprint (everything that changes the trajectory); resuming one whose
fingerprint differs is refused with one line naming each change (old → new) unless
`train.allow_config_change` is set. World size and micro-batch size may change (elastic resume).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ddp_toolkit import checkpoint as ckpt

__all__ = ["CheckpointManager", "EngineState", "RNGState", "Stateful", "broadcast_from_main"]

MODEL_KEY, RNG_KEY, FINGERPRINT_KEY = "model", "rng", "fingerprint"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EngineState:
    """Model weights and optimizer state through the engine (called on every rank; rank 0 writes them)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def model_state(self) -> dict:
        return self.engine.model_state()

    def load_model_state(self, weights: dict, where: Path) -> None:
        try:
            self.engine.load_model_state(weights)
        except RuntimeError as err:
            lines = str(err).splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this model: {detail}") from None

    def state_dict(self) -> dict:
        return self.engine.optimizer_state()

    def load_state_dict(self, state: dict) -> None:
        self.engine.load_optimizer_state(state)

    @property
    def sharded(self) -> bool:
        """True when the engine writes sharded checkpoints (every rank its own shard)."""
        return bool(getattr(self.engine, "sharded_checkpoint", False))

    def sharded_state(self) -> dict:
        return self.engine.sharded_state()

    def load_sharded_state(self, where: Path) -> None:
        """This rank's part of a sharded checkpoint written at any world size."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            self.engine.load_sharded_state(where)
        except (CheckpointException, RuntimeError, KeyError, ValueError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = next((line for line in lines if "Error" in line), lines[0] if lines else type(err).__name__)
            raise ckpt.CheckpointError(f"checkpoint {where} does not fit this model: {detail}") from None


class RNGState:
    """torch, CUDA, numpy and python RNG states of this rank."""

    def state_dict(self) -> dict:
        return ckpt.rng_state()

    def load_state_dict(self, state: dict) -> None:
        ckpt.set_rng_state(state)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object), so that every rank acts on one decision."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool) -> bool:
    """True when every rank's part of a checkpoint write succeeded (so all ranks raise together, none hang)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key old → new` for every key whose value differs (keys missing on one side included)."""
    return [f"{key} {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


class CheckpointManager:
    """Saves `states` (plus model and RNG) every `every` iterations and at the end; resumes the newest one."""

    def __init__(self, root: Path, *, engine_state: EngineState, states: Mapping[str, Stateful],
                 fingerprint: Mapping[str, Any], rank: int, barrier: Callable[[], None], every: int = 0,
                 keep: int = 2, allow_change: bool = False) -> None:
        self.root, self.engine_state, self.states = Path(root), engine_state, dict(states)
        self.fingerprint, self.rank, self.barrier = dict(fingerprint), rank, barrier
        self.every, self.keep, self.allow_change = every, keep, allow_change

    def should_save(self, iteration: int, last: bool) -> bool:
        """Periodic saves only; the end of the run saves through `save` directly."""
        return bool(self.every) and iteration % self.every == 0 and not last

    def save(self, iteration: int) -> Path:
        """Checkpoint now (every rank calls this: optimizer state is gathered, or every rank writes its shard)."""
        sharded = self.engine_state.sharded_state() if self.engine_state.sharded else None
        optimizer_state = None if sharded is not None else self.engine_state.state_dict()
        # every rank: ZeRO-3 gathers the weights collectively (for the others it is a dict of references)
        model_state = None if sharded is not None else self.engine_state.model_state()
        state = None
        if self.rank == 0:
            state = {name: part.state_dict() for name, part in self.states.items()}
            if sharded is None:
                state["optimizer"] = optimizer_state
            state[FINGERPRINT_KEY] = self.fingerprint
        return ckpt.save_checkpoint(self.root, iteration, model_state=model_state, state=state, rank=self.rank,
                                    barrier=self.barrier, keep=self.keep, all_ok=_all_ok, sharded=sharded)

    def find(self, resume: str) -> Path | None:
        """The checkpoint `train.resume` names: None for `never`, the newest valid one for `auto`, or a path."""
        if resume == "never":
            return None
        return ckpt.find_latest(self.root) if resume == "auto" else Path(resume)

    def load(self, path: Path) -> None:
        """Restore every part from `path`, after checking that it belongs to this run."""
        weights, state, rng = ckpt.load_checkpoint(path, self.rank)
        self.check_fingerprint(state.get(FINGERPRINT_KEY) or state.get("plan") or {}, path)
        if weights is None:  # sharded: model and optimizer from the shards, resharded to this world size
            self.engine_state.load_sharded_state(path)
        else:
            self.engine_state.load_model_state(weights, path)
            self.engine_state.load_state_dict(state["optimizer"])
        for name, part in self.states.items():
            if state.get(name) is not None:
                part.load_state_dict(state[name])
        if rng is not None:
            RNGState().load_state_dict(rng)

    def check_fingerprint(self, old: Mapping[str, Any], path: Path) -> None:
        """Refuse a checkpoint of another run, naming what changed."""
        changed = describe_changes(old, self.fingerprint)
        if changed and not self.allow_change:
            raise ckpt.CheckpointError(
                f"checkpoint {path.name} belongs to a different run: {'; '.join(changed)}; start a fresh run "
                f"(train.resume=never), use another run_dir, or set train.allow_config_change=true")
