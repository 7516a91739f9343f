"""tests/conftest.py: with CI=true a skip fails the run unless its reason is about a GPU; GPU skips are listed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SAMPLE = """
import pytest

def test_runs():
    pass

def test_missing_extra():
    pytest.importorskip("a_module_that_is_not_installed")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_gpu():
    pass

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_known_bug():
    assert False
"""


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_sample=SAMPLE)
    return pytester


def test_on_ci_a_skip_for_a_missing_module_fails_and_a_gpu_skip_is_listed(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = project.runpytest("-rs")
    result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped on CI (CI=true)*a_module_that_is_not_installed*",
                                 "*skips allowed on CI (GPU)*", "*test_gpu: needs a CUDA device*"])


def test_off_ci_skips_stay_skips(project, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = project.runpytest()
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert "skips allowed on CI" not in result.stdout.str()


def test_on_ci_a_module_level_skip_fails_collection(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_module='import pytest\npytest.importorskip("not_installed_either")\n\n'
                                    'def test_never():\n    pass\n')
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped on CI (CI=true)*not_installed_either*"])
