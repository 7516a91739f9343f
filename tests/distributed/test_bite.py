"""Trainer claims that planted bugs used to survive, each checked against a value computed by hand here.

All runs happen once, in one spawn of three gloo workers (`bite_pool.py`); each test reads its run directory.
- lr, momentum, beta1/beta2/eps in metrics.jsonl (read from the optimizer) follow the scaling rule and the
  schedule computed here: catches an optimizer built with the base lr, a scheduler that never steps.
- W = 3, k = 3: the weights equal a float64 global-mean SGD step: catches a sync on the wrong micro-step.
- grad_clip, count_items (per-token loss with padding) and num_workers = 2: exact against hand-made steps.
- A model with dropout resumed at an epoch boundary is bit-identical to the uninterrupted run: catches a
  missing RNG restore. Mid-epoch too: the DataLoader's iterator draws from its own generator, not the global RNG.
- The gradient noise scale at W = 2, k = 2 lies within 5 standard deviations of the estimator's own spread,
  simulated here from the per-sample gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddp_toolkit.config import validate
from ddp_toolkit.models import build_model
from ddp_toolkit.sampler import GlobalBatchSampler
from tests.distributed import bite_pool
from tests.distributed.harness import checkpoint_weights, final_weights, max_rel_error, metrics, scenario_dir

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return bite_pool.run_pool(tmp_path_factory.mktemp("bite"))


def run_dir(pool: Path, name: str) -> Path:
    return scenario_dir(pool, name)


# ---- learning rate, momentum, betas, eps: what the optimizer used ------------------------------------------------
def _warmup(peak: float, start: float, warmup: int, j: int) -> float:
    return peak * (start + (1 - start) * j / warmup)


def _cosine(j: int) -> float:  # peak 0.2·16/8, warmup 3 from 0.25·peak, cosine to 0.02 at T = 10
    peak = 0.4
    if j < 3:
        return _warmup(peak, 0.25, 3, j)
    return 0.02 + (peak - 0.02) * 0.5 * (1 + math.cos(math.pi * (j - 3) / 7))


def _step(j: int) -> float:  # peak 0.2·sqrt(16/4), warmup 2 from 0.1·peak, ×0.5 at 5 and 8, floor 0.15
    peak = 0.4
    if j < 2:
        return _warmup(peak, 0.1, 2, j)
    return max(0.15, peak * 0.5 ** sum(1 for m in (5, 8) if m <= j))


SQRT2 = math.sqrt(2.0)
EXPECTED_HPARAMS = {  # name → (lr of the step after j steps, the other columns); B = 16
    "lr_none": (lambda j: 0.2, {"momentum": 0.9}),
    "lr_linear": (lambda j: 0.2 * 16 / 4, {"momentum": 0.9}),
    "lr_sqrt": (lambda j: 0.2 * 2.0, {"momentum": 0.9}),
    # κ = 16/8 = 2: lr·sqrt(κ), 1 − β → κ(1 − β), ε/sqrt(κ) (Malladi et al. 2022)
    "lr_adam_sqrt": (lambda j: 0.01 * SQRT2, {"beta1": 0.8, "beta2": 0.998, "eps": 1e-8 / SQRT2}),
    "lr_cosine": (_cosine, {"momentum": 0.9}),
    "lr_step": (_step, {"momentum": 0.9}),
}


@pytest.mark.parametrize("name", list(EXPECTED_HPARAMS))
def test_logged_optimizer_hparams_follow_rule_and_schedule(pool, name):
    lr_of, others = EXPECTED_HPARAMS[name]
    rows = metrics(run_dir(pool, name))
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    for row in rows:
        j = row["iteration"] - 1  # the row of iteration i shows the step taken after i − 1 steps
        assert row["lr"] == pytest.approx(lr_of(j), rel=1e-12, abs=0), (row["iteration"], row["lr"])
        for key, value in others.items():
            assert row[key] == pytest.approx(value, rel=1e-12), key
    if name == "lr_step":
        assert {round(r["lr"], 12) for r in rows} == {0.04, 0.22, 0.4, 0.2, 0.15}  # every phase was reached


# ---- exact steps: global-mean gradient, clipping, per-token counts, DataLoader workers ----------------------------
def _hand_sgd(model, batches, loss_of, lr: float, clip: float | None = None):
    """Plain SGD on Σ(item losses)/items of each global batch; returns the weights and gradient norms per step."""
    states, norms = [], []
    for batch in batches:
        model.zero_grad()
        total, items = loss_of(model, batch)
        (total / items).backward()
        grads = [p.grad for p in model.parameters()]
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        coef = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s rule
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * coef * p.grad
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        norms.append(norm)
    return states, norms


def _global_batches(n: int, B: int, seed: int, iterations: int) -> list[torch.Tensor]:
    order = GlobalBatchSampler(n, B, B, 1, 0, seed=seed)
    return [torch.tensor(order.global_batch(i)) for i in range(iterations)]


def _classification_reference(raw: dict, clip: float | None = None):
    cfg = validate(raw)
    data = bite_pool.synthetic64(raw)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.x.shape[1], cfg.data.classes)

    def loss_of(m, idx):
        return F.cross_entropy(m(data.x[idx]), data.y[idx], reduction="sum"), len(idx)

    batches = _global_batches(cfg.data.size, cfg.batch.global_batch_size, cfg.train.seed, 2)
    return _hand_sgd(model, batches, loss_of, cfg.optim.lr, clip)


def _assert_two_steps(run: Path, expected: list[dict]) -> None:
    assert max_rel_error(checkpoint_weights(run, 1), expected[0]) <= 1e-10  # a full global batch
    assert max_rel_error(final_weights(run), expected[1]) <= 1e-10  # a short one, with empty cells


def test_sync_on_the_last_of_three_micro_steps_at_three_ranks(pool):
    run = run_dir(pool, "sync_w3k3")
    rows = metrics(run)
    assert [(r["world_size"], r["grad_accum_steps"], r["batch_samples"]) for r in rows] == [(3, 3, 18), (3, 3, 5)]
    expected, _ = _classification_reference(bite_pool.exact_config(run, n=23, b=2, B=18))
    _assert_two_steps(run, expected)


def test_grad_clip_scales_the_synced_gradient(pool):
    run = run_dir(pool, "clip")
    expected, norms = _classification_reference(bite_pool.exact_config(run, n=19, b=4, B=16, grad_clip=0.05),
                                                clip=0.05)
    rows = metrics(run)
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-9)  # the norm before clipping
    assert min(norms) > 2 * 0.05  # clipping changed both steps
    _assert_two_steps(run, expected)


def test_count_items_divides_a_per_token_loss_by_the_global_token_count(pool):
    run = run_dir(pool, "tokens")
    raw = bite_pool.exact_config(run, n=19, b=4, B=16)
    cfg = validate(raw)
    data = bite_pool.token_data(19)
    model = bite_pool.token_model(cfg.train.seed)
    batches = _global_batches(19, 16, cfg.train.seed, 2)

    def loss_of(m, idx):
        targets = data.y[idx]
        real = targets != bite_pool.PAD
        losses = F.cross_entropy(m(data.x[idx])[real], targets[real], reduction="sum")  # padding left out
        return losses, int(real.sum())

    expected, _ = _hand_sgd(model, batches, loss_of, cfg.optim.lr)
    tokens = [int((data.y[idx] != bite_pool.PAD).sum()) for idx in batches]
    assert tokens[0] < 16 * 5  # there is padding to leave out
    rows = metrics(run)
    assert [r["batch_items"] for r in rows] == tokens
    assert [r["items_seen"] for r in rows] == [tokens[0], sum(tokens)]
    _assert_two_steps(run, expected)


def test_dataloader_workers_feed_the_same_exact_steps(pool):
    run = run_dir(pool, "workers")
    pids = {p.name.split("-")[0] for p in (run / "workers").iterdir()}
    assert len(pids) >= 2, "no batch came from a DataLoader worker process"
    expected, _ = _classification_reference(bite_pool.workers_config(run))
    _assert_two_steps(run, expected)


# ---- resume of a model that draws random numbers ----------------------------------------------------------------
TRAJECTORY = ("iteration", "epoch", "samples_seen", "items_seen", "batch_samples", "lr", "momentum", "loss",
              "grad_norm", "skipped_iterations")  # the deterministic columns (timings and memory are not)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in TRAJECTORY} for r in rows]


def _assert_same_run(pool: Path, name: str) -> None:
    full, resumed = run_dir(pool, "resume_full"), run_dir(pool, name)
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max rel. error {max_rel_error(b, a):.3g}"
    assert _comparable(metrics(resumed)) == _comparable(metrics(full))


def test_dropout_resume_at_an_epoch_boundary_is_bit_exact(pool):
    _assert_same_run(pool, "resume_boundary")


def test_dropout_resume_mid_epoch_is_bit_exact(pool):  # the DataLoader has its own generator (trainer.py)
    _assert_same_run(pool, "resume_mid")


# ---- gradient noise scale at W = 2, k = 2 ----------------------------------------------------------------------
def _per_sample_gradients(raw: dict, weights: dict[str, torch.Tensor]) -> np.ndarray:
    """Gradients of each sample's cross-entropy for a linear model: (softmax − onehot) ⊗ [x, 1]."""
    data = bite_pool.synthetic64(raw)
    x, y = data.x, data.y
    residual = torch.softmax(x @ weights["1.weight"].T + weights["1.bias"], dim=1)
    residual[torch.arange(len(y)), y] -= 1.0
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return (residual[:, :, None] * inputs[:, None, :]).reshape(len(x), -1).numpy()


def _simulated_noise_scales(grads: np.ndarray, iterations: int, replicates: int, seed: int = 0) -> np.ndarray:
    """The logged B_simple of `replicates` independent runs at fixed weights: each epoch a fresh permutation, 64
    samples per iteration, two ranks of 32; unbiased |G|², tr Σ per iteration; EMAs (β = 0.99) and their ratio.
    """
    rng = np.random.default_rng(seed)
    n, big_b, small_b, beta = len(grads), 64, 32, 0.99
    per_epoch = n // big_b
    ema_g = np.zeros(replicates)
    ema_t = np.zeros(replicates)
    for t in range(iterations):
        if t % per_epoch == 0:
            perm = rng.permuted(np.tile(np.arange(n), (replicates, 1)), axis=1)
        idx = perm[:, (t % per_epoch) * big_b:(t % per_epoch + 1) * big_b]
        local = grads[idx].reshape(replicates, 2, small_b, -1).mean(axis=2)
        small = (local**2).sum(-1).mean(1)
        big = (local.mean(1) ** 2).sum(-1)
        g_sq = (big_b * big - small_b * small) / (big_b - small_b)
        trace = (small - big) / (1 / small_b - 1 / big_b)
        ema_g = beta * ema_g + (1 - beta) * g_sq
        ema_t = beta * ema_t + (1 - beta) * trace
    return ema_t / ema_g  # the bias corrections 1 − β^t cancel in the ratio


def test_noise_scale_at_two_ranks_with_accumulation_is_within_the_estimators_spread(pool):
    run = run_dir(pool, "noise")
    raw = bite_pool.noise_config(run, bite_pool.NOISE_ITERATIONS)
    rows = metrics(run)
    assert rows[-1]["iteration"] == bite_pool.NOISE_ITERATIONS and rows[-1]["grad_accum_steps"] == 2
    logged = rows[-1]["grad_noise_scale"]
    grads = _per_sample_gradients(raw, final_weights(run))  # lr 1e-9: the weights never moved
    simulated = _simulated_noise_scales(grads, bite_pool.NOISE_ITERATIONS, replicates=200)
    mean, spread = float(simulated.mean()), float(simulated.std())
    mean_grad = grads.mean(0)
    exact = float(((grads - mean_grad) ** 2).sum(1).mean() / (mean_grad @ mean_grad))
    assert 5 * spread < 0.25 * mean, (mean, spread)  # sharp enough to tell b·k from b, or B from B/2
    assert abs(mean - exact) < 0.1 * exact, (mean, exact)  # the simulation estimates what brute force computes
    assert abs(logged - mean) <= 5 * spread, f"logged {logged:.3f}, estimator {mean:.3f} ± {spread:.3f}"
