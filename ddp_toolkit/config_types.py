"""The value types every config field is built from: strict numbers (no booleans or text, no NaN or infinity,
integers in range), widths, seeds, factories, durations, and the section base class (unknown keys forbidden,
assignment validated, attribute docstrings as descriptions)."""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict

from ddp_toolkit.duration import Duration
from ddp_toolkit.text import shown

INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1
WIDTH_MAX = 2**20


def _duration(value: Any) -> Any:
    """`500`, `500it`, `5ep`, `20000sp` or a Duration, validated now and converted through the plan later."""
    if value is None or isinstance(value, Duration):
        return None if value is None else str(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a duration like 500it, 5ep or 20000sp, got {shown(value)}")
    Duration.parse(value)
    return value


Int = Annotated[int, Strict()]  # bounds in Field(...) only: an alias's bounds would override the field's
PosInt = Annotated[int, Strict(), Gt(0), Le(INT64_MAX)]
Count = Annotated[int, Strict(), Ge(0), Le(INT64_MAX)]
Seed = Annotated[int, Strict(), Ge(0), Le(SEED_MAX)]
Width = Annotated[int, Strict(), Gt(0), Le(WIDTH_MAX)]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Fraction = Annotated[float, Strict(), AllowInfNan(False), Ge(0), Lt(1)]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
PathText = Annotated[str, Strict(), Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$")]
Factory = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", max_length=512)]
DurationText = Annotated[str | int, BeforeValidator(_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
