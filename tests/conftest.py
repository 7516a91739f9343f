"""Skips are failures on CI: with CI=true, a test (or a module) skipped for any reason but a missing GPU/CUDA
fails the run, so a missing optional extra cannot hide tests; the GPU skips left are listed at the end."""

from __future__ import annotations

import os
import re

import pytest

ALLOWED_SKIP = re.compile(r"\b(gpu|gpus|cuda|nccl)\b", re.IGNORECASE)
_allowed: list[tuple[str, str]] = []


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _police(report) -> None:
    """Turn a skipped report into a failure on CI unless its reason is about a GPU (xfail is not a skip)."""
    if not (_on_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if ALLOWED_SKIP.search(reason):
        _allowed.append((report.nodeid, reason))
        return
    report.outcome = "failed"
    report.longrepr = f"skipped on CI (CI=true), which counts as a failure: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _police(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _police(report)  # a module-level importorskip / pytest.skip(allow_module_level=True)
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    if _on_ci() and _allowed:
        terminalreporter.section("skips allowed on CI (GPU)")
        for nodeid, reason in _allowed:
            terminalreporter.write_line(f"{nodeid}: {reason}")
