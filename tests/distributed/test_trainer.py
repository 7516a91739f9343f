"""The trainer's claims on real gloo processes: exact gradients for every (W, k) split, one sync per
iteration, trajectory equivalence and bit-exact resume through the real launcher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddp_toolkit.config import validate
from ddp_toolkit.data import build_data
from ddp_toolkit.models import build_model
from ddp_toolkit.sampler import GlobalBatchSampler
from tests.distributed.harness import (
    SyncEveryMicroStep,
    checkpoint_weights,
    final_weights,
    max_rel_error,
    metrics,
    small_config,
    spawn_train,
    torchrun,
    without_measured,
    write_config,
)

pytestmark = pytest.mark.distributed

B = 16
N = 19  # two iterations: a full batch of 16, then 3 samples over W·k cells — with W=2, k=2 a cell is empty


def reference_weights(raw: dict, iterations: int) -> list[dict[str, torch.Tensor]]:
    """Plain SGD (no momentum) on the mean loss of each global batch, in one process, by hand."""
    cfg = validate(raw)
    train_set, _ = build_data(cfg.data)
    x_all, y_all = train_set.x.double(), train_set.y
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, x_all.shape[1], cfg.data.classes)
    order = GlobalBatchSampler(N, B, B, 1, 0, seed=cfg.train.seed)
    out = []
    for i in range(iterations):
        idx = torch.tensor(order.global_batch(i))
        model.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= cfg.optim.lr * p.grad
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize(("world_size", "k", "b"), [(1, 1, 16), (1, 4, 4), (2, 1, 8), (2, 2, 4)])
def test_synced_gradient_is_the_global_batch_mean(tmp_path, world_size, k, b):
    raw = small_config(tmp_path / "run", data={"size": N}, batch={"micro_batch_size": b, "global_batch_size": B},
                       optim={"momentum": 0.0, "lr": 0.5},
                       train={"iterations": 2, "checkpoint_every": 1, "log_every": 1})
    run_dir = spawn_train(raw, world_size)
    expected = reference_weights(raw, 2)
    assert max_rel_error(checkpoint_weights(run_dir, 1), expected[0]) <= 1e-6  # full batch
    assert max_rel_error(final_weights(run_dir), expected[1]) <= 1e-6  # short batch, maybe an empty cell
    rows = metrics(run_dir)
    assert [r["batch_samples"] for r in rows] == [16, 3]
    assert [r["samples_seen"] for r in rows] == [16, 19]


def test_one_allreduce_round_per_iteration(tmp_path):
    common = dict(model={"hidden": [256, 256], "dtype": "float32"}, train={"iterations": 3})
    k1 = metrics(spawn_train(small_config(tmp_path / "k1", batch={"micro_batch_size": 8}, **common), 2))
    k4 = metrics(spawn_train(small_config(tmp_path / "k4", batch={"micro_batch_size": 2}, **common), 2))
    k4_nosync_off = metrics(spawn_train(small_config(tmp_path / "k4s", batch={"micro_batch_size": 2}, **common),
                                        2, engine=SyncEveryMicroStep))
    buckets = k1[0]["allreduces_per_iteration"]
    assert buckets >= 1 and all(r["grad_accum_steps"] == 4 for r in k4)
    for row in k4:
        assert row["allreduce_rounds_per_iteration"] == 1
        assert row["allreduces_per_iteration"] == buckets  # the number of DDP buckets, not k× that
        assert row["allreduce_bytes_per_iteration"] == k1[0]["allreduce_bytes_per_iteration"]
    for row in k4_nosync_off:
        assert row["allreduce_rounds_per_iteration"] == 4
        assert row["allreduces_per_iteration"] == 4 * buckets


def test_trajectory_equivalence_through_torchrun(tmp_path):
    raw = small_config(tmp_path / "x", data={"size": 200}, train={"iterations": 32, "log_every": 4},
                       optim={"lr": 0.1, "warmup": 5, "schedule": "cosine"})
    config = write_config(raw, tmp_path / "cfg.yaml")
    a = torchrun(config, 2, f"run_dir={tmp_path / 'w2k2'}", "batch.micro_batch_size=4")
    assert a.returncode == 0, a.stderr[-3000:]
    b = torchrun(config, 1, f"run_dir={tmp_path / 'w1k4'}", "batch.micro_batch_size=4")
    assert b.returncode == 0, b.stderr[-3000:]
    rows_a, rows_b = metrics(tmp_path / "w2k2"), metrics(tmp_path / "w1k4")
    assert [r["grad_accum_steps"] for r in rows_a[:1] + rows_b[:1]] == [2, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("iteration", "epoch", "samples_seen", "global_batch_size", "lr"):
            assert ra[key] == rb[key]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-9)
    assert max_rel_error(final_weights(tmp_path / "w2k2"), final_weights(tmp_path / "w1k4")) <= 1e-5


def test_resume_is_bit_exact_and_elastic(tmp_path):
    raw = small_config(tmp_path / "x", data={"size": 150}, train={"iterations": 30, "log_every": 1},
                       optim={"lr": 0.1, "warmup": 4, "schedule": "cosine"})
    config = write_config(raw, tmp_path / "cfg.yaml")
    full = torchrun(config, 2, f"run_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    part = torchrun(config, 2, f"run_dir={tmp_path / 'part'}", "train.halt_at=13")
    assert part.returncode == 0, part.stderr[-3000:]
    assert not (tmp_path / "part" / "final" / "model.safetensors").exists()  # halted: no final weights
    rest = torchrun(config, 2, f"run_dir={tmp_path / 'part'}", "train.resume=auto")
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert without_measured(metrics(tmp_path / "part")) == without_measured(metrics(tmp_path / "full"))
    # elastic: stop at W=2, continue at W=1 with the same global batch (k doubles)
    part2 = torchrun(config, 2, f"run_dir={tmp_path / 'elastic'}", "train.halt_at=13")
    assert part2.returncode == 0, part2.stderr[-3000:]
    rest2 = torchrun(config, 1, f"run_dir={tmp_path / 'elastic'}", "train.resume=auto")
    assert rest2.returncode == 0, rest2.stderr[-3000:]
    rows = metrics(tmp_path / "elastic")
    assert [r["iteration"] for r in rows] == list(range(1, 31))
    assert [r["world_size"] for r in rows] == [2] * 13 + [1] * 17
    assert [r["samples_seen"] for r in rows] == [r["samples_seen"] for r in metrics(tmp_path / "full")]
    assert max_rel_error(final_weights(tmp_path / "elastic"), a) <= 1e-5
