"""`Duration`: one value type for a length of training — `500it`, `5ep`, `2.5ep`, `20000sp`.

Parsed once (from config text, a CLI flag or an int of iterations) and converted to iterations only through
a `BatchPlan` (`plan.iterations_in(duration)`), so every part of the toolkit agrees on what `1ep` means.
No torch import: this is part of the pure core.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, get_args

from ddp_toolkit.errors import InputError

__all__ = ["Duration", "DurationError", "DurationUnit", "DURATION_UNITS"]

DurationUnit = Literal["it", "ep", "sp"]
DURATION_UNITS: tuple[str, ...] = get_args(DurationUnit)
"""it: iterations (optimizer steps); ep: epochs (passes over the data set); sp: samples (global)."""

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(it|ep|sp)?\s*$")
_FORMS = "an int of iterations or a string like 500it, 500, 5ep, 2.5ep or 20000sp"


class DurationError(InputError):
    """Text that is not a duration; the message repeats it (shortened) and lists the valid forms."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, order=False)
class Duration:
    """A length of training in one unit; `value` is whole for `it` and `sp`, any finite ≥ 0 for `ep`."""

    value: float
    unit: DurationUnit = "it"

    def __post_init__(self) -> None:
        if self.unit not in DURATION_UNITS:
            raise DurationError(f"bad duration unit {_shown(self.unit)}: expected one of {', '.join(DURATION_UNITS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise DurationError(f"bad duration {_shown(self.value)}: expected {_FORMS}")
        if not math.isfinite(self.value) or self.value < 0:
            raise DurationError(f"bad duration {_shown(self.value)}: must be finite and >= 0; expected {_FORMS}")
        if self.unit != "ep" and not float(self.value).is_integer():
            raise DurationError(f"bad duration {self.value}{self.unit}: {self.unit} must be a whole number")
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def parse(cls, text: Duration | str | int) -> Duration:
        """`500it`, `500` or 500 (iterations), `5ep` / `2.5ep` (epochs), `20000sp` (samples)."""
        if isinstance(text, Duration):
            return text
        if isinstance(text, bool) or not isinstance(text, (int, str)):
            raise DurationError(f"bad duration {_shown(text)}: expected {_FORMS}")
        if isinstance(text, int):
            if text < 0:
                raise DurationError(f"bad duration {text!r}: must be >= 0; expected {_FORMS}")
            return cls(float(text), "it")
        match = _DURATION_RE.match(text)
        if match is None:
            raise DurationError(f"bad duration {_shown(text)}: expected {_FORMS}")
        value, unit = float(match.group(1)), match.group(2) or "it"
        if unit != "ep" and not value.is_integer():
            raise DurationError(f"bad duration {_shown(text)}: {unit} must be a whole number; expected {_FORMS}")
        return cls(value, unit)  # type: ignore[arg-type]

    @classmethod
    def iterations(cls, n: int) -> Duration:
        return cls(float(n), "it")

    @classmethod
    def epochs(cls, n: float) -> Duration:
        return cls(float(n), "ep")

    @classmethod
    def samples(cls, n: int) -> Duration:
        return cls(float(n), "sp")

    def __str__(self) -> str:
        """The canonical text, which `parse` reads back to an equal value: `500it`, `2.5ep`, `20000sp`."""
        # positional digits (no exponent, which the parser refuses), exactly the shortest repr's digits
        amount = f"{int(self.value)}" if self.value.is_integer() else f"{Decimal(repr(self.value)):f}"
        return f"{amount}{self.unit}"
