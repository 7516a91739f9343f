"""Console wording shared by every tool: counts with the right plural, values repeated in errors kept short.

No imports beyond the standard library, so the pure core and the CLI can both use it.
"""

from __future__ import annotations

__all__ = ["MAX_SHOWN", "count", "one_line", "plural", "shown"]

MAX_SHOWN = 80
"""An error repeats at most this many characters of a value it was given."""

def plural(n: float, noun: str, many: str | None = None) -> str:
    """`noun` or its plural for the count `n`: 1 device, 2 devices, 0.5 epochs, 1 batch, 3 batches."""
    if n == 1:
        return noun
    if many:
        return many
    return f"{noun}es" if noun.endswith(("atch", "sh", "s", "x", "z")) else f"{noun}s"


def count(n: float, noun: str, many: str | None = None) -> str:
    """`n noun` with the right plural and thousands separators: `1 epoch`, `6,000 iterations`, `2.5 epochs`."""
    if isinstance(n, float) and not n.is_integer():
        number = f"{n:.6g}"
    else:
        number = f"{int(n):,}"
    return f"{number} {plural(n, noun, many)}"


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """repr(value), shortened to `limit` characters with `...` so that a huge value cannot flood an error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: str, limit: int = 2000) -> str:
    """Line breaks and runs of whitespace folded into single spaces; at most `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."
