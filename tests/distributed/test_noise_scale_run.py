"""The gradient noise scale of a real run against brute force.

B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) is computed exactly from the per-sample gradients of a linear
softmax model at the run's final weights, and compared with the `grad_noise_scale` the run logged: from the
DDP comm hook's local/global norms with W = 2, from the first micro-batch against the whole batch with W = 1.

Why the comparison is lenient (a factor of 2, though it usually lands within 10 %): the logged value is a
ratio of EMAs (β = 0.99, a memory of ~100 iterations) of per-iteration estimates taken along a moving
trajectory, each of them noisy, from batches drawn without replacement. To make "the final weights" a fair
reference, the lr drops 100× after 60 iterations, so the last ~240 iterations hardly move the weights and the
EMA has mostly forgotten the fast early phase (where B_simple was smaller).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddp_toolkit.config import validate
from ddp_toolkit.data import build_data
from tests.distributed.harness import final_weights, metrics, small_config, spawn_train, torchrun, write_config

pytestmark = pytest.mark.distributed

ITERATIONS = 300


def _config(run_dir: Path) -> dict:
    return small_config(
        run_dir,
        data={"name": "synthetic", "size": 16384, "eval_size": 100, "features": 16, "classes": 4, "noise": 0.5},
        model={"name": "linear", "hidden": [], "dtype": "float32"},
        batch={"micro_batch_size": 128, "global_batch_size": 256},
        optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "schedule": "step", "step_milestones": [60],
               "step_gamma": 0.01},
        train={"iterations": ITERATIONS, "log_every": 20, "seed": 0, "noise_scale": True},
    )


def brute_force_noise_scale(raw: dict, weights: dict[str, torch.Tensor]) -> float:
    """tr(Σ)/|G|² from every training sample's gradient of the cross-entropy of a linear model (float64).

    For logits z = W·x + b the per-sample gradient is (softmax(z) − onehot(y)) ⊗ [x, 1]; G is their mean and
    tr(Σ) the mean squared distance to it (Σ with divisor N, the population covariance).
    """
    train_set, _ = build_data(validate(raw).data)
    x, y = train_set.x.double(), train_set.y
    weight, bias = weights["1.weight"].double(), weights["1.bias"].double()
    residual = torch.softmax(x @ weight.T + bias, dim=1)
    residual[torch.arange(len(y)), y] -= 1.0
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    grads = (residual[:, :, None] * inputs[:, None, :]).reshape(len(x), -1)
    mean = grads.mean(0)
    gradient_sq = float(mean @ mean)
    trace_sigma = float((grads**2).sum(1).mean()) - gradient_sq
    return trace_sigma / gradient_sq


def _logged(run_dir: Path) -> list[tuple[int, float | None]]:
    return [(r["iteration"], r.get("grad_noise_scale")) for r in metrics(run_dir)]


def _check(run_dir: Path, raw: dict) -> tuple[float, float]:
    logged = _logged(run_dir)
    assert logged[-1][0] == ITERATIONS
    late = [value for iteration, value in logged if iteration >= 100]
    assert late and all(v is not None and math.isfinite(v) and v > 0 for v in late), logged
    measured, exact = late[-1], brute_force_noise_scale(raw, final_weights(run_dir))
    assert exact / 2 <= measured <= exact * 2, f"logged B_simple {measured:.1f}, brute force {exact:.1f}"
    return measured, exact


def test_two_process_run_logs_a_noise_scale_close_to_brute_force(tmp_path: Path) -> None:
    raw = _config(tmp_path / "w2")
    result = torchrun(write_config(raw, tmp_path / "w2.yaml"), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    measured, exact = _check(tmp_path / "w2", raw)
    assert 20 < exact < 2000  # the run is in the regime where B_simple is measurable with B = 256


def test_one_process_with_accumulation_measures_it_from_micro_batches(tmp_path: Path) -> None:
    raw = _config(tmp_path / "w1")  # W = 1, k = 2: the first micro-batch (128) against the batch (256)
    spawn_train(raw, 1)
    _check(tmp_path / "w1", raw)
    no_accumulation = _config(tmp_path / "k1")
    no_accumulation["batch"] = {"micro_batch_size": 256, "global_batch_size": 256}
    no_accumulation["train"]["iterations"] = 20
    no_accumulation["optim"].update(schedule="constant", step_milestones=[])
    spawn_train(no_accumulation, 1)
    assert {value for _, value in _logged(tmp_path / "k1")} == {None}  # one batch size only: no estimate
