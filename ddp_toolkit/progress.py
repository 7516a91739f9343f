"""Global training counters, totals over all ranks, saved and restored with every checkpoint.

The training position lives here and only here: the sampler is told (epoch, iteration_in_epoch) by the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Progress"]

_RENAMED = {"tokens_seen": "items_seen"}
"""Keys of older checkpoints and their current names."""


@dataclass
class Progress:
    """Where the run is; every count is global (all ranks), not per process."""

    iteration: int = 0
    """Optimizer steps taken (skipped updates included: an iteration is one pass over a global batch)."""
    epoch: int = 0
    """Current epoch (0-based): the one the next iteration belongs to."""
    iteration_in_epoch: int = 0
    """Iterations already taken in the current epoch."""
    samples_seen: int = 0
    """Training samples consumed by all ranks together."""
    items_seen: int = 0
    """Loss items counted by all ranks together: samples for a per-sample loss, tokens for a token loss."""
    skipped_iterations: int = 0
    """Iterations whose update was skipped for a non-finite gradient (train.on_nonfinite=skip)."""

    def advance(self, samples: int, items: int, iterations_per_epoch: int, skipped: bool = False) -> None:
        """Count one finished iteration of `samples` samples and `items` loss items."""
        self.iteration += 1
        self.samples_seen += samples
        self.items_seen += items
        self.skipped_iterations += int(skipped)
        self.iteration_in_epoch += 1
        if self.iteration_in_epoch == iterations_per_epoch:
            self.epoch += 1
            self.iteration_in_epoch = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        fields = set(asdict(self))
        for key, value in state.items():
            key = _RENAMED.get(key, key)
            if key in fields:
                setattr(self, key, int(value))
