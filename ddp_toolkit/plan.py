"""Batch arithmetic: global batch B = micro_batch_size b × world_size W × grad_accum_steps k.

Everything else in the toolkit trusts these numbers, so this module has no torch import and every
impossible plan raises one `PlanError` whose message names every factor and what would be valid.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass

from ddp_toolkit.duration import Duration
from ddp_toolkit.errors import InputError

__all__ = ["BatchPlan", "Duration", "PlanError", "as_int", "cell_bounds", "parse_duration", "split_evenly"]

class PlanError(InputError):
    """A batch plan that cannot exist; the message names every factor involved."""


class IntegerTypeError(PlanError, TypeError):
    """A count given as a bool, float or string where an integer is needed."""


def as_int(name: str, value: object, minimum: int = 1, error: type[InputError] = PlanError) -> int:
    """The one integer check: ints and numpy ints pass, bools, floats (even 4.0) and strings do not."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise IntegerTypeError(f"{name} must be {wanted}, got {value!r}")
    try:
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise IntegerTypeError(f"{name} must be {wanted}, got {value!r}") from None
    if value < minimum:
        raise error(f"{name} must be {wanted}, got {value}")
    return value



def parse_duration(text: Duration | str | int) -> Duration:
    """Parse `500it`, `500` (iterations), `5ep` / `2.5ep` (epochs) or `20000sp` (samples) into a Duration."""
    return Duration.parse(text)


def cell_bounds(count: int, parts: int, cell: int) -> tuple[int, int]:
    """[start, stop) of cell `cell` when `count` slots are cut into `parts` contiguous cells differing by ≤ 1
    (the first `count mod parts` cells hold one more)."""
    base, extra = divmod(count, parts)
    start = cell * base + min(cell, extra)
    return start, start + base + (1 if cell < extra else 0)


def split_evenly(count: int, parts: int) -> list[int]:
    """Split `count` items into `parts` cells whose sizes differ by at most one, larger cells first."""
    return [stop - start for start, stop in (cell_bounds(count, parts, c) for c in range(parts))]


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of one run; `global_batch_size` = b · W · k, fixed for the whole run."""

    dataset_size: int
    """N: samples in one epoch of the training set."""
    micro_batch_size: int
    """b: samples per device per forward pass (one micro_step)."""
    world_size: int
    """W: number of data-parallel processes."""
    grad_accum_steps: int = 1
    """k: micro_steps per device per iteration; gradients are synced on the last one only."""
    drop_last: bool = False
    """Drop the final short global batch of every epoch instead of training on it."""

    def __post_init__(self) -> None:
        for name in ("dataset_size", "micro_batch_size", "world_size", "grad_accum_steps"):
            object.__setattr__(self, name, as_int(name, getattr(self, name)))
        if self.drop_last and self.dataset_size < self.global_batch_size:
            raise PlanError(
                f"dataset_size {self.dataset_size} is smaller than global_batch_size {self.global_batch_size} "
                f"(= micro_batch_size {self.micro_batch_size} × world_size {self.world_size} × "
                f"grad_accum_steps {self.grad_accum_steps}) with drop_last: an epoch would have 0 iterations; "
                f"use drop_last=false or a global batch of at most {self.dataset_size}"
            )

    @classmethod
    def solve(
        cls,
        dataset_size: int,
        *,
        global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        world_size: int | None = None,
        grad_accum_steps: int | None = None,
        drop_last: bool = False,
    ) -> BatchPlan:
        """Build a plan from any three of {B, b, W, k}, deriving the missing one (all four: checked)."""
        given = {
            "global_batch_size": global_batch_size,
            "micro_batch_size": micro_batch_size,
            "world_size": world_size,
            "grad_accum_steps": grad_accum_steps,
        }
        missing = [name for name, value in given.items() if value is None]
        if len(missing) > 1:
            raise PlanError(f"give at least three of global_batch_size, micro_batch_size, world_size, "
                            f"grad_accum_steps; missing: {', '.join(missing)}")
        for name, value in given.items():
            if value is not None:
                given[name] = as_int(name, value)
        if not missing or missing[0] != "global_batch_size":
            _derive_factor(given, missing[0] if missing else None)
        return cls(
            dataset_size=dataset_size,
            micro_batch_size=given["micro_batch_size"],
            world_size=given["world_size"],
            grad_accum_steps=given["grad_accum_steps"],
            drop_last=drop_last,
        )

    # ---- batch sizes -------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        """B = b · k · W: samples in one iteration, over all ranks and micro_steps."""
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def local_batch_size(self) -> int:
        """b · k: samples one rank processes per iteration."""
        return self.micro_batch_size * self.grad_accum_steps

    # ---- one epoch ----------------------------------------------------------------------------------
    @property
    def iterations_per_epoch(self) -> int:
        """floor(N / B) with drop_last, else ceil(N / B)."""
        if self.drop_last:
            return self.dataset_size // self.global_batch_size
        return -(-self.dataset_size // self.global_batch_size)

    @property
    def micro_steps_per_epoch_per_rank(self) -> int:
        """Forward/backward passes one rank runs per epoch (a short last batch still takes k)."""
        return self.iterations_per_epoch * self.grad_accum_steps

    @property
    def dropped_samples_per_epoch(self) -> int:
        """Samples never seen in an epoch: N mod B with drop_last, else 0."""
        return self.dataset_size % self.global_batch_size if self.drop_last else 0

    @property
    def samples_per_epoch(self) -> int:
        """Samples used for training in one epoch (N minus the dropped ones)."""
        return self.dataset_size - self.dropped_samples_per_epoch

    @property
    def last_batch_size(self) -> int:
        """Size of the final global batch of an epoch (B unless it is short)."""
        remainder = self.dataset_size % self.global_batch_size
        return self.global_batch_size if self.drop_last or remainder == 0 else remainder

    def batch_size_of(self, iteration_in_epoch: int) -> int:
        """Global batch size of the given 0-based iteration within an epoch."""
        if not 0 <= iteration_in_epoch < self.iterations_per_epoch:
            raise PlanError(f"iteration_in_epoch {iteration_in_epoch} is outside "
                            f"[0, {self.iterations_per_epoch}) iterations_per_epoch")
        last = iteration_in_epoch == self.iterations_per_epoch - 1
        return self.last_batch_size if last else self.global_batch_size

    def split_counts(self, global_count: int) -> list[list[int]]:
        """Samples per [micro_step][rank] for a global batch of `global_count` samples.

        A full batch gives b everywhere; a short one is spread over the W·k cells in micro_step-major
        order (cell c = micro_step · W + rank) so that cell sizes differ by at most one.
        """
        if not 0 <= global_count <= self.global_batch_size:
            raise PlanError(f"global_count {global_count} must be in [0, {self.global_batch_size}]")
        cells = split_evenly(global_count, self.world_size * self.grad_accum_steps)
        w = self.world_size
        return [cells[m * w:(m + 1) * w] for m in range(self.grad_accum_steps)]

    def cell_range(self, iteration_in_epoch: int, micro_step: int, rank: int) -> tuple[int, int]:
        """Epoch positions [start, stop) that (micro_step, rank) gets in global batch `iteration_in_epoch`.

        The one layout rule: the batch's n slots are cut into W·k cells, cell c = micro_step · W + rank, in
        order (see `split_counts`); every rank computes its own cells with no communication.
        """
        if not (0 <= micro_step < self.grad_accum_steps and 0 <= rank < self.world_size):
            raise PlanError(f"(micro_step {micro_step}, rank {rank}) is outside grad_accum_steps "
                            f"{self.grad_accum_steps} × world_size {self.world_size}")
        return self.cell_range_at(iteration_in_epoch * self.global_batch_size,
                                  self.batch_size_of(iteration_in_epoch), micro_step, rank)

    def cell_range_at(self, start: int, count: int, micro_step: int, rank: int) -> tuple[int, int]:
        """`cell_range` for a global batch of `count` samples starting at epoch position `start` (with a batch-size
        schedule a batch may start anywhere): its slots cut into W·k cells, cell c = micro_step · W + rank."""
        begin, end = cell_bounds(count, self.world_size * self.grad_accum_steps, micro_step * self.world_size + rank)
        return start + begin, start + end

    @property
    def last_batch_split(self) -> list[list[int]]:
        """How the last (possibly short) global batch splits across [micro_step][rank]."""
        return self.split_counts(self.last_batch_size)

    # ---- epochs <-> iterations ----------------------------------------------------------------------
    def iterations_for(self, epochs: float) -> int:
        """Iterations in `epochs` epochs (fractional epochs round up to a whole iteration)."""
        if epochs < 0:
            raise PlanError(f"epochs must be >= 0, got {epochs}")
        exact = epochs * self.iterations_per_epoch
        return int(math.ceil(exact - 1e-9))

    def epochs_for(self, iterations: int) -> float:
        """Epochs covered by `iterations` iterations (a float)."""
        if iterations < 0:
            raise PlanError(f"iterations must be >= 0, got {iterations}")
        return iterations / self.iterations_per_epoch

    def iterations_for_samples(self, samples: int) -> int:
        """Iterations needed to see at least `samples` samples, counting short last batches exactly."""
        if samples < 0:
            raise PlanError(f"samples must be >= 0, got {samples}")
        full_epochs, rest = divmod(samples, self.samples_per_epoch)
        return full_epochs * self.iterations_per_epoch + -(-rest // self.global_batch_size)

    def iterations_in(self, duration: Duration | str | int) -> int:
        """A duration (`500it`, `5ep`, `20000sp`, 500 or a Duration) in iterations.

        Epochs round up to a whole iteration; samples count short last batches exactly.
        """
        d = Duration.parse(duration)
        if d.unit == "ep":
            return self.iterations_for(d.value)
        if d.unit == "sp":
            return self.iterations_for_samples(int(d.value))
        return int(d.value)

    def samples_for(self, iterations: int) -> int:
        """Samples seen (over all ranks) after `iterations` iterations from the start of epoch 0."""
        full_epochs, rest = divmod(iterations, self.iterations_per_epoch)
        return full_epochs * self.samples_per_epoch + rest * self.global_batch_size

    def describe(self) -> str:
        """One line: `global batch 512 = 32 micro × 4 devices × 4 accumulation`."""
        return (f"global batch {self.global_batch_size} = {self.micro_batch_size} micro × "
                f"{self.world_size} devices × {self.grad_accum_steps} accumulation")

    def to_dict(self) -> dict:
        """All inputs and derived numbers, with the names used in JSON output and metrics."""
        out = asdict(self)
        for name in ("global_batch_size", "local_batch_size", "iterations_per_epoch",
                     "micro_steps_per_epoch_per_rank", "samples_per_epoch", "dropped_samples_per_epoch",
                     "last_batch_size", "last_batch_split"):
            out[name] = getattr(self, name)
        return out


def _derive_factor(given: dict, missing: str | None) -> None:
    """Fill in the missing factor of B = b·W·k, or check all four; raise naming every factor."""
    B, b, W, k = (given["global_batch_size"], given["micro_batch_size"], given["world_size"],
                  given["grad_accum_steps"])
    if missing is None:
        if b * W * k != B:
            raise PlanError(f"global_batch_size {B} != micro_batch_size {b} × world_size {W} × "
                            f"grad_accum_steps {k} = {b * W * k}")
        return
    divisor = {"micro_batch_size": lambda: W * k, "world_size": lambda: b * k,
               "grad_accum_steps": lambda: b * W}[missing]()
    if B % divisor:
        text = {"micro_batch_size": f"world_size {W} × grad_accum_steps {k}",
                "world_size": f"micro_batch_size {b} × grad_accum_steps {k}",
                "grad_accum_steps": f"micro_batch_size {b} × world_size {W}"}[missing]
        lower, upper = (B // divisor) * divisor, (B // divisor + 1) * divisor
        valid = f"{lower} or {upper}" if lower else f"{upper}"
        raise PlanError(f"global_batch_size {B} is not divisible by {text} = {divisor}, so {missing} "
                        f"would not be an integer; use a global_batch_size of {valid}, or change the factors")
    given[missing] = B // divisor
