"""Global training counters, totals over all ranks, saved and restored with every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Progress:
    """Where the run is; every count is global (all ranks), not per process."""

    iteration: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch (0-based): the one the next iteration belongs to."""
    iteration_in_epoch: int = 0
    """Iterations already taken in the current epoch."""
    micro_step: int = 0
    """Forward/backward passes per rank so far (k per iteration)."""
    samples_seen: int = 0
    """Training samples consumed by all ranks together."""
    tokens_seen: int = 0
    """Items counted by a token-level loss (equal to samples_seen for per-sample losses)."""
    skipped_iterations: int = 0
    """Iterations whose update was skipped for a non-finite gradient (train.on_nonfinite=skip)."""

    def advance(self, samples: int, items: int, grad_accum_steps: int, iterations_per_epoch: int) -> None:
        """Count one finished iteration of `samples` samples and `items` loss items."""
        self.iteration += 1
        self.micro_step += grad_accum_steps
        self.samples_seen += samples
        self.tokens_seen += items
        self.iteration_in_epoch += 1
        if self.iteration_in_epoch == iterations_per_epoch:
            self.epoch += 1
            self.iteration_in_epoch = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))
