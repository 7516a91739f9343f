"""Command-line parsing that fails in one line: the argparse parser classes and a typed converter for every
kind of flag value (counts, finite numbers, durations, node counts, endpoints, one-line text).

Each converter carries its `kind` and bounds, so tests can derive bad values for every flag from the parser.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from ddp_toolkit.duration import Duration
from ddp_toolkit.errors import InputError
from ddp_toolkit.text import MAX_SHOWN, one_line, shown

__all__ = ["Count", "DurationArg", "Endpoint", "IntermixedParser", "NodeRange", "Number", "OneLine", "Parser",
           "UsageError"]


class UsageError(InputError):
    """Bad input from the command line: printed as one line, exit code 2."""


_LONG_QUOTED = re.compile("'([^']{" + str(MAX_SHOWN) + ",})'")


def _short_quotes(message: str) -> str:
    """Shorten every long quoted value argparse repeats (invalid choices, bad values) to MAX_SHOWN characters."""
    return _LONG_QUOTED.sub(lambda m: shown(m.group(1)), message)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(one_line(_short_quotes(f"{self.prog}: {message}"), 400))


class IntermixedParser(Parser):
    """Options and positionals in any order: `plan CONFIG --world-size 4 train.iterations=20`."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:  # Python < 3.12 calls back in here from parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _bad(text: str, wanted: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {wanted}, got {shown(text)}")


@dataclass(frozen=True)
class Count:
    """An integer flag in [minimum, maximum]: `4`; not `4.0`, `true`, `nan` or `-1` when minimum is 0."""

    minimum: int = 1
    maximum: int = 2**31 - 1
    kind: str = "int"

    def __call__(self, text: str) -> int:
        wanted = f"an integer in [{self.minimum}, {self.maximum}]"
        if not re.fullmatch(r"\s*[-+]?\d{1,19}\s*", text):
            raise _bad(text, wanted)
        value = int(text)
        if not self.minimum <= value <= self.maximum:
            raise _bad(text, wanted)
        return value


@dataclass(frozen=True)
class Number:
    """A finite real flag above `minimum` (or at it when `inclusive`): `0.1`, `1e-3`; never nan or inf."""

    minimum: float = 0.0
    inclusive: bool = False
    kind: str = "float"

    def __call__(self, text: str) -> float:
        wanted = f"a finite number {'>=' if self.inclusive else '>'} {self.minimum:g}"
        try:
            value = float(text)
        except ValueError:
            raise _bad(text, wanted) from None
        above = value >= self.minimum if self.inclusive else value > self.minimum
        if not math.isfinite(value) or not above or len(text) > 64:
            raise _bad(text, wanted)
        return value


@dataclass(frozen=True)
class DurationArg:
    """A duration flag: `500`, `500it`, `5ep`, `20000sp`, more than zero."""

    kind: str = "duration"

    def __call__(self, text: str) -> Duration:
        try:
            value = Duration.parse(text)
        except InputError:
            raise _bad(text, "a duration like 500it, 5ep or 20000sp") from None
        if value.value <= 0:
            raise _bad(text, "a duration more than zero")
        return value


@dataclass(frozen=True)
class NodeRange:
    """`--nnodes`: a node count `2` or an elastic range `MIN:MAX` with 1 <= MIN <= MAX."""

    kind: str = "nnodes"

    def __call__(self, text: str) -> str:
        match = re.fullmatch(r"(\d{1,6})(?::(\d{1,6}))?", text.strip())
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
        if not match or not 1 <= low <= high:
            raise _bad(text, "a node count like 2 or a range MIN:MAX with 1 <= MIN <= MAX")
        return text.strip()


@dataclass(frozen=True)
class Endpoint:
    """`HOST:PORT` with a port in 1..65535 (a host name, IPv4 or [IPv6])."""

    kind: str = "endpoint"

    def __call__(self, text: str) -> str:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]{1,253}|\[[0-9A-Fa-f:.]+\]):(\d{1,5})", text.strip())
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise _bad(text, "HOST:PORT with a port in 1..65535")
        return text.strip()


@dataclass(frozen=True)
class OneLine:
    """Free text for a script or a file name: one line, no control characters, at most `maximum` characters."""

    maximum: int = 1024
    pattern: str | None = None
    wanted: str = "one line of text"
    kind: str = "text"

    def __call__(self, text: str) -> str:
        plain = text and len(text) <= self.maximum and text.isprintable()
        if not plain or (self.pattern is not None and not re.fullmatch(self.pattern, text)):
            raise _bad(text, self.wanted)
        return text


def split_config_inputs(inputs: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key.path=value ...]` → (CONFIG or None, overrides): the first item is a config file when it has
    no `=` (or names an existing file)."""
    from pathlib import Path

    items = list(inputs)
    if items and ("=" not in items[0] or Path(items[0]).is_file()):
        return items[0], items[1:]
    return None, items
