"""Real workloads across processes: token-exact losses for every step shape, and the shipped examples.

Each shape — `(inputs, targets)` per-token with padding, dict batches with an HF-style `.logits` output, a user
step function — trains 11 variable-length byte sequences of the standard library's source at B = 8 (b = 2): the
second global batch holds 3 sequences over W·k = 4 cells, so one cell is empty. W = 2·k = 2 and W = 1·k = 4 must
both equal a float64 hand-computed step on the mean loss per token of each global batch (each sequence run on
its own, no padding); eval loss per token and perplexity, and tokens_seen, are checked against the same hand
computation. The same runs on DeepSpeed ZeRO-1 (float32: ZeRO keeps float32 master weights) must equal it too.
Every run happens in one spawn of two gloo workers (the W = 2 runs in one process group, then the W = 1 runs
split between the two workers).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch import nn

from ddp_toolkit.config import validate
from ddp_toolkit.models import ByteTransformer
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.sampler import GlobalBatchSampler
from ddp_toolkit.step import FunctionStep, token_cross_entropy
from ddp_toolkit.workload import build_workload
from tests.distributed.harness import (
    REPO,
    TRAIN_SCRIPT,
    Scenario,
    config_scenario,
    final_weights,
    free_port,
    max_rel_error,
    metrics,
    pool_group,
    run_scenario,
    scenario_dir,
    scenario_env,
    worker_env,
)

pytestmark = pytest.mark.distributed
EXAMPLES = REPO / "configs" / "examples"
SHAPES = ("tuple", "dict", "function")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO1 = {"engine": "deepspeed", "deepspeed_config": str(REPO / "configs" / "deepspeed" / "zero1.json")}
# ZeRO-1 runs in float32 against the float64 hand step (2 iterations, SGD with momentum): 7.2e-7 measured on the
# weights, 1.8e-8 on the eval loss. The bar is the for float32 (1e-5 after 20 iterations); the weighting
# bugs planted to check it are 4 orders above: the mean of micro-batch means (weights off by 1.0e-1 to 2.4e-1),
# DeepSpeed dividing by k again (scale_wrt_gas=True: 5.1e-1 to 7.6e-1).
FLOAT32_TOLERANCE = 1e-5


class HFStyle(nn.Module):
    """`model(input_ids=..., attention_mask=...)` returning an object with `.logits`, as Hugging Face models do."""

    def __init__(self, info) -> None:
        super().__init__()
        self.core = ByteTransformer(info.vocab_size, info.seq_len + 1, width=8, layers=1, heads=2)

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.core(input_ids))


def step_fn(model, batch):
    """A user step: (sum of token losses, tokens)."""
    inputs, targets = batch
    return token_cross_entropy()(model(inputs), targets).sum(), int((targets != -100).sum())


def count_tokens(batch) -> int:
    return int((batch[1] != -100).sum())


def raw_config(run_dir: Path, shape: str, zero1: bool = False) -> dict:
    """The run of `shape`; `zero1`: on DeepSpeed ZeRO-1, in float32 (the same initial weights: built in float32)."""
    data = {"name": "text", "size": 11, "eval_size": 5, "seq_len": 24, "collate": "ddp_toolkit.data:pad_tokens"}
    model = {"name": "transformer", "width": 8, "layers": 1, "heads": 2, "dtype": "float32" if zero1 else "float64"}
    train = {"iterations": 2, "log_every": 1, "seed": 5, "loss": "token_cross_entropy", **(ZERO1 if zero1 else {})}
    if shape == "dict":
        data["collate"] = "ddp_toolkit.data:pad_tokens_dict"
        model.update(name="custom", factory="tests.distributed.test_workloads:HFStyle")
        train["causal_shift"] = True
    return {"run_dir": str(run_dir), "data": data, "model": model, "batch": {"micro_batch_size": 2,
            "global_batch_size": 8}, "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.9},
            "train": train, "report": {"console": False}}


def hand_run(raw: dict) -> tuple[dict[str, torch.Tensor], int, float]:
    """Float64 reference: each global batch's mean loss per token, every sequence on its own; returns the final
    weights, the tokens seen and the eval loss per token."""
    cfg = validate(raw)
    w = build_workload(cfg)
    model, sequences, evals = w.model, w.train_set.dataset, w.eval_set.dataset
    core = model.core if hasattr(model, "core") else model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    plan = BatchPlan.solve(len(sequences), global_batch_size=8, micro_batch_size=8, world_size=1)
    sampler = GlobalBatchSampler.from_plan(plan, 0, seed=cfg.train.seed)
    sampler.set_epoch(0)
    tokens_seen = 0
    for indices in sampler:
        seqs = [sequences[i] for i in indices]
        tokens = sum(len(s) - 1 for s in seqs)
        loss = sum(F.cross_entropy(core(s[None, :-1])[0], s[1:], reduction="sum") for s in seqs) / tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens_seen += tokens
    with torch.no_grad():
        eval_sum = sum(float(F.cross_entropy(core(s[None, :-1])[0], s[1:], reduction="sum")) for s in evals)
    eval_loss = eval_sum / sum(len(s) - 1 for s in evals)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, tokens_seen, eval_loss


RUNS = {"w2": (2, False), "w1": (1, False), "zero1_w2": (2, True), "zero1_w1": (1, True)}
"""Run name → (world size, on ZeRO-1); B = 8, b = 2, so W = 2 has k = 2 and W = 1 has k = 4."""


def _scenarios(root: Path) -> list[tuple[str, int, Scenario]]:
    out = []
    for shape in SHAPES:
        kwargs = {"step": FunctionStep(step_fn, count=count_tokens)} if shape == "function" else {}
        for run, (world_size, zero1) in RUNS.items():
            if HAS_DEEPSPEED or not zero1:
                raw = raw_config(root / f"{shape}_{run}", shape, zero1)
                out.append((f"{shape}_{run}", world_size, config_scenario(raw, **kwargs)))
    return out


def _pool_worker(rank: int, root: Path, port: int) -> None:
    torch.set_num_threads(1)
    plan = _scenarios(root)
    with pool_group(rank, 2, port):
        for name, _, run in (s for s in plan if s[1] == 2):
            run_scenario(root / name, rank, run, scenario_env(rank, 2))
    for name, _, run in [s for s in plan if s[1] == 1][rank::2]:
        run_scenario(root / name, rank, run, scenario_env(0, 1))


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Every run of every shape, in one spawn of two workers."""
    root = tmp_path_factory.mktemp("workloads")
    mp.spawn(_pool_worker, args=(root, free_port()), nprocs=2, join=True)
    return root


def _assert_hand_step(pool: Path, tmp_path: Path, shape: str, runs: tuple[str, ...], tolerance: float) -> None:
    ref, tokens_seen, eval_loss = hand_run(raw_config(tmp_path / "hand", shape))
    for run in runs:
        run_dir = scenario_dir(pool, f"{shape}_{run}")
        assert max_rel_error(final_weights(run_dir), ref) <= tolerance, (shape, run)
        rows, evals = metrics(run_dir), metrics(run_dir, "eval")
        assert rows[-1]["tokens_seen"] == rows[-1]["items_seen"] == tokens_seen
        assert math.isclose(evals[-1]["eval_loss"], eval_loss, rel_tol=tolerance)
        assert math.isclose(evals[-1]["eval_perplexity"], math.exp(eval_loss), rel_tol=tolerance)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_step_shape_is_the_exact_global_token_mean(pool, tmp_path, shape):
    _assert_hand_step(pool, tmp_path, shape, ("w2", "w1"), 1e-12)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="the deepspeed extra is not installed")
@pytest.mark.parametrize("shape", SHAPES)
def test_every_step_shape_is_the_global_token_mean_under_deepspeed_zero1(pool, tmp_path, shape):
    _assert_hand_step(pool, tmp_path, shape, ("zero1_w2", "zero1_w1"), FLOAT32_TOLERANCE)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="the accelerate extra is not installed")
@pytest.mark.parametrize("shape", ("tuple", "dict"))
def test_step_shapes_are_the_exact_global_token_mean_under_accelerate_launch(tmp_path, shape):
    """The config-reachable shapes through a real `accelerate launch` (MULTI_CPU, W = 2, k = 2): the same float64
    hand step. (A step function is a Python object: it reaches the loop through Trainer(step=...), checked above.)"""
    raw = raw_config(tmp_path / "run", shape)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                           "2", "--main_process_port", str(free_port()), str(TRAIN_SCRIPT), str(config)],
                          capture_output=True, text=True, timeout=300, env=worker_env({"ACCELERATE_USE_CPU": "true"}),
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert {r["world_size"] for r in metrics(tmp_path / "run")} == {2}
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["engine"] == "accelerate"
    ref, tokens_seen, eval_loss = hand_run(raw_config(tmp_path / "hand", shape))
    assert max_rel_error(final_weights(tmp_path / "run"), ref) <= 1e-12
    assert metrics(tmp_path / "run")[-1]["tokens_seen"] == tokens_seen
    assert math.isclose(metrics(tmp_path / "run", "eval")[-1]["eval_loss"], eval_loss, rel_tol=1e-12)


# ---- the shipped examples, a few iterations each, through the real launchers -------------------------------
def _importable(module: str) -> str | None:
    """None when `module` imports, else why not (a torchvision built for another torch raises RuntimeError)."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"{module} does not import here: {done.stderr.strip().splitlines()[-1]}"


def _check_run(done: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert done.returncode == 0, done.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert metrics(run_dir, "eval"), "no eval row"


SMOKE = ["train.iterations=3", "train.log_every=1", "data.eval_size=16", "report.console=false"]


def _launch_example(name: str, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", "launch", "--nproc-per-node", "2",
                           str(EXAMPLES / f"{name}.yaml"), *SMOKE, f"run_dir={run_dir}"], capture_output=True,
                          text=True, timeout=300, env=worker_env(), cwd=REPO)


@pytest.mark.parametrize(("name", "module"), [("char_lm", None), ("hf_causal_lm", "transformers")])
def test_example_runs_under_ddp_toolkit_launch(tmp_path, name, module):
    if module:
        reason = _importable(module)
        if reason:
            pytest.skip(reason)
    _check_run(_launch_example(name, tmp_path / "run"), tmp_path / "run")


def test_resnet_example_runs_or_names_the_missing_extra(tmp_path):
    """With a torchvision that imports here, the example runs; without one (none installed, or PyPI's 0.28.0 beside
    the CPU torch 2.13.0 wheel: 'operator torchvision::nms does not exist') it must stop before any worker starts:
    one line naming torchvision, exit 2."""
    done = _launch_example("resnet_digits", tmp_path / "run")
    if _importable("torchvision") is None:
        _check_run(done, tmp_path / "run")
        return
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and "torchvision" in lines[-1]


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="the accelerate extra is not installed")
def test_char_lm_runs_under_accelerate_launch(tmp_path):
    env = worker_env({"ACCELERATE_USE_CPU": "true"})
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                           "2", "--main_process_port", str(free_port()), str(TRAIN_SCRIPT),
                           str(EXAMPLES / "char_lm.yaml"), *SMOKE, f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    _check_run(done, tmp_path / "run")


def test_launch_runs_a_users_own_script(tmp_path):
    script = tmp_path / "my_script.py"
    script.write_text("import os, sys\nprint('rank', os.environ['RANK'], os.environ['WORLD_SIZE'], sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-m", "ddp_toolkit.cli", "launch", "--nproc-per-node", "2", str(script),
                           "a=1", "--", "--lr", "0.1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == \
        ["rank 0 2 ['a=1', '--lr', '0.1']", "rank 1 2 ['a=1', '--lr', '0.1']"]
