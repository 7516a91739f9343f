"""One error base for the whole toolkit: every error knows its exit code, and the CLI catches this type only.

Bad input (a config value, a flag, a plan that cannot exist, a checkpoint of another run) exits 2; a failure
of the run itself (a non-finite loss, a Slurm command that failed, a disk that is full) exits 1. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["EXIT_INPUT", "EXIT_RUN", "InputError", "RunError", "ToolkitError"]

EXIT_INPUT = 2
"""Exit code for bad input: nothing was started, nothing was written."""
EXIT_RUN = 1
"""Exit code for a run that started and failed (the message says what survives)."""


class ToolkitError(Exception):
    """Base of every error the toolkit raises on purpose; the message is one line."""

    exit_code: int = EXIT_RUN


class InputError(ToolkitError, ValueError):
    """Bad input from the user: a config value, a flag, an impossible plan."""

    exit_code = EXIT_INPUT


class RunError(ToolkitError, RuntimeError):
    """The run started and could not go on; the message names what happened and what was kept."""

    exit_code = EXIT_RUN
