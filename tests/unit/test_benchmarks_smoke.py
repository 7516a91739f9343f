"""The benchmark scripts still run end to end (tiny sizes, `--quick`): JSON on stdout, their own checks pass.

Figures are not asserted: performance claims live in benchmarks/README.md as ratios measured side by side.
Each script's main() runs in this process (its workers are spawned as usual), which saves a torch import.
"""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_quick(monkeypatch, capsys, script: str) -> dict:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # spawned workers inherit sys.path and import the script
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # `--device cpu` in process; restored after the test
    try:
        module = importlib.import_module(script)
        capsys.readouterr()
        module.main(["--quick", "--device", "cpu"])
        return json.loads(capsys.readouterr().out)
    finally:  # the scripts are not a package: leave no top-level `comm` module behind
        sys.modules.pop(script, None)
        sys.modules.pop("_common", None)


@pytest.mark.distributed
def test_loop_overhead_quick(monkeypatch, capsys):
    pytest.importorskip("accelerate")
    document = run_quick(monkeypatch, capsys, "loop_overhead")
    results = document["results"]
    assert all(check["ok"] for check in results["verification"].values()), results["verification"]
    for case in ("compute_bound", "overhead_bound"):
        seconds = results[case]["seconds_per_iteration"]
        assert set(seconds) == {"hand", "trainer", "accelerate"}
        assert all(s["checks_ok"] and s["median"] > 0 for s in seconds.values()), seconds
        assert results[case]["ratios"]["trainer/hand"] > 0


@pytest.mark.distributed
def test_comm_quick(monkeypatch, capsys):
    document = run_quick(monkeypatch, capsys, "comm")
    assert all(document["checks"].values()), document["checks"]
    assert [row["grad_accum_steps"] for row in document["results"]] == [1, 4]



def test_data_wait_quick(monkeypatch, capsys):
    document = run_quick(monkeypatch, capsys, "data_wait")
    results = document["results"]
    assert [r["num_workers"] for r in results] == [0, 2]
    assert all(0 <= r["data_wait_fraction_median"] <= 1 for r in results), results
