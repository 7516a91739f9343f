"""Batch-size schedules: the global batch size B changes by phase, W and b stay fixed and k follows each phase.

Large-batch practice grows the batch during training (Megatron's batch-size ramp-up; the critical batch size
grows as the loss falls, McCandlish et al. 2018; Merrill et al. 2025). Here phase j holds for every iteration
that *starts* before its `until` (a Duration counted from the start of the run: samples, iterations or
epochs); the last phase has no end.

Exactness. The global order of an epoch is fixed by (seed, epoch, N) alone (the sampler's permutation), and an
iteration takes the next B_j positions of it (fewer at the epoch's end). A change of B mid-epoch therefore only
cuts the rest of the epoch into batches of the new size: every sample is still seen exactly once per epoch, the
order of samples never depends on W or k, and the position — kept in samples (`Position.epoch_position`) — is
all a resume needs. With drop_last an epoch ends when the samples left cannot fill the next iteration's batch.

Counting. A fractional epoch is a fraction of the data set: `epochs_at` = epoch + epoch_position / N, and with a
schedule an `ep` duration means that position. A one-phase schedule converts durations through its BatchPlan,
unchanged. Conversions jump whole runs of equal batches at once (O(epochs × phases), not O(iterations)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ddp_toolkit.duration import Duration
from ddp_toolkit.plan import BatchPlan, PlanError

__all__ = ["BatchSchedule", "Phase", "Position", "epochs_at", "ramp_phases"]


@dataclass(frozen=True)
class Position:
    """Where a run is, between two iterations; every count is global (all ranks)."""

    iteration: int = 0
    """Iterations (optimizer steps) done."""
    epoch: int = 0
    """The epoch the next iteration belongs to (0-based)."""
    epoch_position: int = 0
    """Positions of this epoch's global order already trained on: the next iteration starts here."""
    samples_seen: int = 0
    """Samples trained on since the start of the run."""


def epochs_at(pos: Position, dataset_size: int) -> float:
    """Epochs done, fractional: epoch + epoch_position / N (a fraction of the data set's samples)."""
    return pos.epoch + pos.epoch_position / dataset_size


@dataclass(frozen=True)
class Phase:
    """One phase of a batch-size schedule: its plan (B = b·W·k) and where it ends (None: the last phase)."""

    plan: BatchPlan
    until: Duration | None = None


def ramp_phases(start: int, increment: int, final: int, over: Duration | str | int) -> list[tuple[int, Duration]]:
    """Megatron's batch-size ramp-up as phases: B = start, start + increment, … each for an equal share of `over`,
    then `final` (the returned list holds the ramp's (B, until) pairs; the caller appends the final phase)."""
    over = Duration.parse(over)
    if final <= start or (final - start) % increment:
        raise PlanError(f"batch.ramp: final global_batch_size {final} must be start {start} plus a positive multiple "
                        f"of increment {increment}")
    steps = (final - start) // increment
    out = []
    for i in range(steps):
        share = (i + 1) * over.value / steps
        end = share if over.unit == "ep" else math.ceil(share - 1e-9)
        out.append((start + i * increment, Duration(end, over.unit)))
    return out


class BatchSchedule:
    """The phases of a run's global batch size and the arithmetic of positions, durations and epochs."""

    def __init__(self, phases: Sequence[Phase]) -> None:
        phases = tuple(phases)
        if not phases:
            raise PlanError("a batch schedule needs at least one phase")
        first = phases[0].plan
        for j, phase in enumerate(phases):
            last = j == len(phases) - 1
            if (phase.until is None) != last:
                raise PlanError(f"batch.schedule[{j}]: every phase but the last needs `until` (the last has none)")
            p = phase.plan
            same = (p.dataset_size, p.world_size, p.micro_batch_size, p.drop_last)
            if same != (first.dataset_size, first.world_size, first.micro_batch_size, first.drop_last):
                raise PlanError(f"batch.schedule[{j}]: dataset_size, world_size, micro_batch_size and drop_last must "
                                f"be the same in every phase (only B and k change)")
        self.phases = phases

    @classmethod
    def fixed(cls, plan: BatchPlan) -> BatchSchedule:
        """The schedule of a run whose B never changes."""
        return cls([Phase(plan)])

    @classmethod
    def of_sizes(cls, base: BatchPlan, sizes: Sequence[tuple[int, Duration | str | None]]) -> BatchSchedule:
        """Phases of global batch sizes [(B_j, until_j)], each split as b × W × k_j; one line names a B_j that
        b·W does not divide."""
        phases = []
        for j, (size, until) in enumerate(sizes):
            try:
                plan = BatchPlan.solve(base.dataset_size, global_batch_size=size, world_size=base.world_size,
                                       micro_batch_size=base.micro_batch_size, drop_last=base.drop_last)
            except PlanError as err:
                raise PlanError(f"batch phase {j} (global_batch_size {size}): {err}") from None
            phases.append(Phase(plan, None if until is None else Duration.parse(until)))
        return cls(phases)

    # ---- what holds at a position ------------------------------------------------------------------------------
    @property
    def is_fixed(self) -> bool:
        return len(self.phases) == 1

    @property
    def first(self) -> BatchPlan:
        return self.phases[0].plan

    @property
    def dataset_size(self) -> int:
        return self.first.dataset_size

    def reached(self, duration: Duration, pos: Position) -> bool:
        """Whether `pos` is at or past `duration` from the start of the run."""
        if duration.unit == "it":
            return pos.iteration >= duration.value
        if duration.unit == "sp":
            return pos.samples_seen >= duration.value
        return pos.epoch * self.dataset_size + pos.epoch_position >= self._epoch_target(duration)

    def _epoch_target(self, duration: Duration) -> int:
        return math.ceil(duration.value * self.dataset_size - 1e-9)

    def phase_index(self, pos: Position) -> int:
        """The phase the iteration starting at `pos` belongs to."""
        for j, phase in enumerate(self.phases):
            if phase.until is None or not self.reached(phase.until, pos):
                return j
        raise AssertionError("the last phase has no end")

    def plan_at(self, pos: Position) -> BatchPlan:
        return self.phases[self.phase_index(pos)].plan

    def batch_size_at(self, pos: Position) -> int:
        """Samples of the iteration starting at `pos`: B of its phase, fewer at the end of an epoch."""
        return min(self.plan_at(pos).global_batch_size, self.dataset_size - pos.epoch_position)

    def after(self, pos: Position, samples: int | None = None) -> Position:
        """The position after the iteration starting at `pos` (of `samples` samples, default its batch size)."""
        samples = self.batch_size_at(pos) if samples is None else samples
        moved = Position(pos.iteration + 1, pos.epoch, pos.epoch_position + samples, pos.samples_seen + samples)
        left = self.dataset_size - moved.epoch_position
        if left <= 0 or (self.first.drop_last and left < self.plan_at(moved).global_batch_size):
            return replace(moved, epoch=pos.epoch + 1, epoch_position=0)
        return moved

    def epochs_at(self, pos: Position) -> float:
        """Epochs done, fractional: epoch + epoch_position / N."""
        return epochs_at(pos, self.dataset_size)

    # ---- walking ---------------------------------------------------------------------------------------------
    def _iterations_to(self, duration: Duration, pos: Position, size: int) -> int:
        """Iterations of `size` samples from `pos` until `duration` is reached (ignoring the epoch's end)."""
        if duration.unit == "it":
            return int(duration.value) - pos.iteration
        if duration.unit == "sp":
            return -(-(int(duration.value) - pos.samples_seen) // size)
        done = pos.epoch * self.dataset_size + pos.epoch_position
        return -(-(self._epoch_target(duration) - done) // size)

    def _jump(self, pos: Position, stop: Duration) -> Position:
        """Several iterations at once: up to the next epoch end, phase change or `stop`, whichever comes first."""
        j = self.phase_index(pos)
        size, left = self.phases[j].plan.global_batch_size, self.dataset_size - pos.epoch_position
        in_epoch = left // size if self.first.drop_last else -(-left // size)
        limits = [in_epoch, self._iterations_to(stop, pos, size)]
        if self.phases[j].until is not None:
            limits.append(self._iterations_to(self.phases[j].until, pos, size))
        n = max(1, min(limits))
        full = n - 1  # full batches strictly inside the epoch and the phase: no check needed
        pos = replace(pos, iteration=pos.iteration + full, epoch_position=pos.epoch_position + full * size,
                      samples_seen=pos.samples_seen + full * size)
        nxt = self.after(pos)
        if self.phase_index(nxt) > j + 1:  # phase j + 1 ended before it began
            raise PlanError(self._empty_phase_message(j + 1, nxt))
        return nxt

    def _empty_phase_message(self, j: int, pos: Position) -> str:
        return (f"batch.schedule[{j}] (until {self.phases[j].until}) would get no iteration: the run is already past "
                f"it at iteration {pos.iteration} ({pos.samples_seen} samples); each phase must end after the one "
                f"before it")

    def walk(self, stop: Duration | str | int, start: Position | None = None) -> Position:
        """The position at which `stop` (a duration from the start of the run) is first reached."""
        stop, pos = Duration.parse(stop), start or Position()
        if self.phase_index(Position()) != 0:
            raise PlanError(self._empty_phase_message(0, Position()))
        while not self.reached(stop, pos):
            pos = self._jump(pos, stop)
        return pos

    def position_after(self, iterations: int) -> Position:
        """The position after `iterations` iterations from the start of the run."""
        return self.walk(Duration(int(iterations), "it"))

    def iterations_in(self, duration: Duration | str | int) -> int:
        """A duration in iterations (one phase: the plan's conversion; several: where the walk reaches it)."""
        if self.is_fixed:
            return self.first.iterations_in(duration)
        return self.walk(duration).iteration

    def epochs_for(self, iterations: int) -> float:
        """Fractional epochs after `iterations` iterations (a fraction of the data set's samples)."""
        return self.epochs_at(self.position_after(iterations))

    def samples_for(self, iterations: int) -> int:
        """Samples seen after `iterations` iterations."""
        return self.position_after(iterations).samples_seen

    def phase_starts(self, total: int) -> list[tuple[int, Position]]:
        """(phase index, position of its first iteration) for every phase that starts within `total` iterations."""
        out, pos = [(0, Position())], Position()
        for j, phase in enumerate(self.phases[:-1]):
            pos = self.walk(phase.until, pos)
            if pos.iteration >= total:
                break
            out.append((j + 1, pos))
        return out

    def describe(self) -> str:
        """`128 until 20000sp → 512 until 60000sp → 2048`."""
        return " → ".join(f"{p.plan.global_batch_size}" + (f" until {p.until}" if p.until is not None else "")
                          for p in self.phases)
