"""Global training counters, totals over all ranks, saved and restored with every checkpoint.

The training position lives here and only here: the sampler is told (epoch, iteration_in_epoch) by the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ddp_toolkit.batch_schedule import Position

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
    epoch_position: int = 0
    """Positions of the current epoch's global order already trained on (the next iteration starts here); -1 when
    a checkpoint from before batch-size schedules did not record it (the trainer derives it)."""
    samples_seen: int = 0
    """Training samples consumed by all ranks together."""
    items_seen: int = 0
    """Loss items counted by all ranks together: samples for a per-sample loss, tokens for a token loss."""
    skipped_iterations: int = 0
    """Iterations whose update was skipped for a non-finite gradient (train.on_nonfinite=skip)."""

    def position(self) -> Position:
        """The position the next iteration starts at (what the batch schedule and the sampler need)."""
        return Position(self.iteration, self.epoch, self.epoch_position, self.samples_seen)

    def advance(self, to: Position, items: int, skipped: bool = False) -> None:
        """Count one finished iteration that moved the run to `to` (`BatchSchedule.after`), with `items` items."""
        if to.iteration != self.iteration + 1:
            raise ValueError(f"an iteration moves from iteration {self.iteration} to {self.iteration + 1}, "
                             f"not {to.iteration}")
        self.iteration_in_epoch = 0 if to.epoch != self.epoch else self.iteration_in_epoch + 1
        self.iteration, self.epoch, self.epoch_position, self.samples_seen = (
            to.iteration, to.epoch, to.epoch_position, to.samples_seen)
        self.items_seen += items
        self.skipped_iterations += int(skipped)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch_position = -1  # unknown unless the checkpoint has it
        fields = set(asdict(self))
        for key, value in state.items():
            key = _RENAMED.get(key, key)
            if key in fields:
                setattr(self, key, int(value))
