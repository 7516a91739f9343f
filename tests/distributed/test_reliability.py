"""Runs that die: killed workers, torn checkpoints, changed configs, non-finite losses."""

from __future__ import annotations

import random
import subprocess
import time

import psutil
import pytest
import torch

from tests.distributed.harness import (
    REPO,
    final_weights,
    metrics,
    small_config,
    torchrun,
    torchrun_command,
    without_measured,
    worker_env,
    write_config,
)

pytestmark = pytest.mark.distributed



def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True) if "train.py" in " ".join(p.cmdline())]


def _inode(run_dir) -> int | None:
    try:
        return (run_dir / "metrics.jsonl").stat().st_ino
    except OSError:
        return None


def _latest_iteration(run_dir) -> int:
    try:
        rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return 0
    return len(rows) and int(rows[-1].split('"iteration": ')[1].split(",")[0])


def test_sigkilled_workers_restart_from_checkpoint_bit_exact(tmp_path):
    """Five SIGKILLs at seeded iterations under --max-restarts: same final weights, every iteration once."""
    raw = small_config(tmp_path / "x", data={"size": 2000, "features": 64}, model={"hidden": [256, 256]},
                       batch={"micro_batch_size": 16, "global_batch_size": 64},
                       train={"iterations": 160, "log_every": 1, "checkpoint_every": 7, "resume": "auto",
                              "dist_timeout_s": 20},
                       optim={"lr": 0.05, "warmup": 10, "schedule": "cosine"})
    config = write_config(raw, tmp_path / "cfg.yaml")
    full = torchrun(config, 2, f"run_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]

    rng = random.Random(20261123)
    kill_at = sorted(rng.sample(range(10, 150, 10), 5))
    kill_at = [k + rng.randrange(10) for k in kill_at]
    run_dir = tmp_path / "crashy"
    # a restarted group occasionally hangs in its gloo rendezvous (torch elastic, loopback): dist_timeout_s turns
    # that into an error and another restart, so allow spare restarts
    cmd = torchrun_command(config, 2, f"run_dir={run_dir}", max_restarts=10)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=worker_env())
    launcher, killed, metrics_inode = psutil.Process(proc.pid), [], None
    deadline = time.monotonic() + 400
    while kill_at and proc.poll() is None and time.monotonic() < deadline:
        # kill only while training: after a restart, wait until the resumed run has rewritten metrics.jsonl
        if _inode(run_dir) != metrics_inode and _latest_iteration(run_dir) >= kill_at[0]:
            workers = _workers(launcher)
            if len(workers) == 2:
                victim = rng.choice(workers)
                victim.kill()
                killed.append(kill_at.pop(0))
                metrics_inode = _inode(run_dir)
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(killed) == 5, f"only killed at {killed}"
    a, b = final_weights(tmp_path / "full"), final_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics(run_dir)
    assert [r["iteration"] for r in rows] == list(range(1, 161))  # overlap rewritten: none twice, none missing
    assert without_measured(rows) == without_measured(metrics(tmp_path / "full"))


def test_torn_checkpoint_falls_back_with_a_warning(tmp_path):
    raw = small_config(tmp_path / "x", data={"size": 150},
                       train={"iterations": 30, "checkpoint_every": 5, "keep_checkpoints": 3})
    config = write_config(raw, tmp_path / "cfg.yaml")
    full = torchrun(config, 2, f"run_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    part = torchrun(config, 2, f"run_dir={tmp_path / 'part'}", "train.halt_at=13")
    assert part.returncode == 0, part.stderr[-3000:]
    newest = tmp_path / "part" / "checkpoints" / "it00000013" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a write cut short
    rest = torchrun(config, 2, f"run_dir={tmp_path / 'part'}", "train.resume=auto")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "skipping damaged checkpoint it00000013" in rest.stderr
    assert "resumed_from" in (tmp_path / "part" / "plan.json").read_text()
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["iteration"] for r in metrics(tmp_path / "part")] == list(range(1, 31))


def test_changed_config_on_resume_is_refused_unless_allowed(tmp_path):
    raw = small_config(tmp_path / "run", data={"size": 150}, train={"iterations": 20})
    config = write_config(raw, tmp_path / "cfg.yaml")
    assert torchrun(config, 2, "train.halt_at=6").returncode == 0
    for override, fragment in (("batch.global_batch_size=32", "global_batch_size 16 → 32"),
                               ("data.size=140", "dataset_size 150 → 140"), ("train.seed=4", "seed 3 → 4")):
        proc = torchrun(config, 2, "train.resume=auto", override)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors and fragment in errors[0] and "train.allow_config_change" in errors[0], proc.stderr[-2000:]
    # elastic: another world size and micro-batch with the same global batch is accepted
    ok = torchrun(config, 1, "train.resume=auto", "batch.micro_batch_size=8")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert [r["world_size"] for r in metrics(tmp_path / "run")][-1] == 1
    forced = torchrun(config, 2, "train.resume=auto", "train.seed=4", "train.allow_config_change=true",
                      f"run_dir={tmp_path / 'run'}")
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_nonfinite_stop_and_skip(tmp_path):
    base = dict(data={"name": "custom", "factory": "tests.fixtures.factories:data_with_nan"},
                model={"dtype": "float32"}, train={"iterations": 8, "log_every": 1})
    stop = small_config(tmp_path / "stop", **base)
    proc = torchrun(write_config(stop, tmp_path / "stop.yaml"), 2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "non-finite gradient norm" in errors[0] and "at iteration" in errors[0]
    bad_iteration = int(errors[0].split("at iteration ")[1].split(";")[0])
    checkpoint = tmp_path / "stop" / "checkpoints" / f"it{bad_iteration - 1:08d}"
    assert checkpoint.is_dir()  # the last good state

    skip = small_config(tmp_path / "skip", **{**base, "train": {**base["train"], "on_nonfinite": "skip"}})
    proc = torchrun(write_config(skip, tmp_path / "skip.yaml"), 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"iteration {bad_iteration}: non-finite gradient norm" in proc.stderr
    weights = final_weights(tmp_path / "skip")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["iteration"] for r in metrics(tmp_path / "skip")] == list(range(1, 9))
