"""Stop requests: SIGUSR1 / SIGTERM to a worker, or the preemption flag file, and the vote that makes every
rank stop after the same iteration.

The vote rides on the iteration's one scalar all-reduce (`ScalarReduce` in metrics.py): each rank adds its
local request (0 or 1) to the values it reduces anyway, so a stop costs no extra collective on logged
iterations. Under SLURM (the flag file is watched) the reduce also runs on every `check_every`-th iteration
so a preemption warning is acted on within that many iterations.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from ddp_toolkit.cluster import PREEMPT_ENV, PREEMPT_FILE_NAME

__all__ = ["StopVote"]


class StopVote:
    """One rank's view of the stop request, and the agreed decision once the vote has been reduced."""

    def __init__(self, run_dir: Path, *, watch_file: bool | None = None, check_every: int = 1,
                 is_main: bool = True) -> None:
        self.file = Path(os.environ.get(PREEMPT_ENV) or Path(run_dir) / PREEMPT_FILE_NAME)
        self.watched = PREEMPT_ENV in os.environ if watch_file is None else watch_file
        self.check_every = max(1, check_every)
        self.is_main = is_main
        self.signal: str | None = None
        self.votes = 0.0
        self._old: dict[int, object] = {}

    # ---- the local request -----------------------------------------------------------------------
    def install(self) -> None:
        """Catch SIGUSR1 and SIGTERM (main thread only); `restore` puts the previous handlers back."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def local_request(self) -> float:
        """1.0 when this rank was asked to stop (a signal, or the flag file on rank 0), else 0.0.

        Only rank 0 looks at the flag file: the vote tells the others, and no rank but one touches the disk.
        """
        if self.signal is None and self.is_main and self.file.exists():
            self.signal = "PREEMPT file"
        return 1.0 if self.signal is not None else 0.0

    # ---- the vote ----------------------------------------------------------------------------------
    def due(self, iteration: int) -> bool:
        """Must this iteration's scalar reduce run for the vote alone (not logged, flag file watched)?"""
        return self.watched and iteration % self.check_every == 0

    def record(self, reduced_votes: float) -> None:
        """The all-reduced sum of every rank's `local_request()`."""
        self.votes = reduced_votes

    @property
    def stop(self) -> bool:
        """The agreed decision: True on every rank once any rank asked."""
        return self.votes > 0

    def describe(self) -> str:
        return self.signal or "on another rank"

    def acknowledge(self, text: str) -> None:
        """Rank 0 writes into the flag file what was saved: the batch script requeues only when it says so."""
        if self.is_main and self.watched:
            self.file.write_text(text + "\n")
