"""benchmarks/memory.py --quick: FSDP's Adam state per rank at W = 2 is within 10 % of half of DDP's (issue #15)."""

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.distributed
def test_memory_quick_fsdp_halves_optimizer_state(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # spawned workers inherit sys.path and import the script
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        module = importlib.import_module("memory")
        capsys.readouterr()
        module.main(["--quick"])
        document = json.loads(capsys.readouterr().out)
    finally:  # the scripts are not a package: leave no top-level module behind
        sys.modules.pop("memory", None)
        sys.modules.pop("_common", None)
    rows = {(r["engine"], r["world_size"]): r for r in document["results"]}
    assert set(rows) == {("ddp", 1), ("fsdp", 1), ("ddp", 2), ("fsdp", 2)}
    assert not [r["error"] for r in rows.values() if "error" in r]
    ddp, fsdp = rows["ddp", 2], rows["fsdp", 2]
    assert ddp["optimizer_state_max"] == 2 * ddp["parameters_max"] > 0  # Adam: exp_avg and exp_avg_sq, fp32
    assert abs(fsdp["optimizer_state_max"] / (ddp["optimizer_state_max"] / 2) - 1) <= 0.10, (fsdp, ddp)
    assert all(r["optimizer_state"] > 0 for r in fsdp["ranks"])  # every rank holds a shard
    assert document["checks"] == {"fsdp_w2_optimizer_state_within_10pct_of_ideal": True}
