"""Host synchronisations per iteration, counted: at most one on a non-logged iteration (reading the gradient
norm), with the noise scale, the SLURM stop vote and token counting all on.

On CPU a read of a tensor's value costs nothing, but on a GPU every `.item()`, `float(t)`, `bool(t)` or
`.tolist()` waits for the device; this test counts those calls in real gloo workers (W = 2) as a stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.harness import free_port, small_config

pytestmark = pytest.mark.distributed

_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def _worker(rank: int, world_size: int, port: int, raw: dict, out: str) -> None:
    from ddp_toolkit.config import validate
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.recipe import train_from_config
    from ddp_toolkit.trainer import Trainer

    torch.set_num_threads(1)
    calls = {"n": 0}
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    per_iteration: list[dict] = []
    iteration, reduce_and_log = Trainer._iteration, Trainer._reduce_and_log

    def timed_iteration(self, batches):
        calls["start"] = calls["n"]
        return iteration(self, batches)

    def timed_reduce(self, result, it, last):
        reduce_and_log(self, result, it, last)
        per_iteration.append({"iteration": it, "logged": self.metrics.should_log(it, last),
                              "reads": calls["n"] - calls["start"]})

    Trainer._iteration, Trainer._reduce_and_log = timed_iteration, timed_reduce
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                  master_port=port, launcher="test")
    train_from_config(validate(raw), env=env)
    Path(out, f"rank{rank}.json").write_text(json.dumps(per_iteration))


def test_at_most_one_host_read_per_non_logged_iteration(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DDP_TOOLKIT_PREEMPT_FILE", str(tmp_path / "PREEMPT"))  # the stop vote as under SLURM
    raw = small_config(tmp_path / "run", data={"size": 96, "eval_size": 0},
                       batch={"micro_batch_size": 4, "global_batch_size": 16},
                       train={"iterations": 12, "log_every": 5, "noise_scale": True, "checkpoint_every": 100})
    mp.spawn(_worker, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["iteration"] for r in rows] == list(range(1, 13))
        quiet = [r["reads"] for r in rows if not r["logged"]]
        assert len(quiet) == 9 and max(quiet) <= 1, rows
        assert all(r["reads"] >= 1 for r in rows)  # the gradient norm is read every iteration (the counter works)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["grad_noise_scale"] is not None  # the queued norms did reach the estimator
