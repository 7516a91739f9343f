"""The first GPU run (#22, #18): one script, ≤ 8 minutes on one GPU, no downloads; one JSON file and a Markdown table.

Cells (each in its own process, so a crash or a process-wide setting stays in its cell; a failed cell is
recorded and the next one runs):
  nccl_init         the toolkit's process-group setup with device_id on CUDA (W = all visible GPUs, ≤ 2)
  default_config    configs/default.yaml at W = 1 on the device
  lm                configs/examples/char_lm.yaml (a tiny causal LM on random tokens when it is missing, and in
                    --dry-run)
  bf16_vs_fp32      the LM twice, fp32 and bf16 autocast, same seed: loss curves within BF16_TOLERANCE
  compute_bound     an MLP 1024-8192-8192-10, b = 512, bf16: achieved FLOP/s, MFU and peak memory
  loops             benchmarks/loop_overhead.py: trainer vs hand loop vs Accelerate on a compute-bound model
  compile           benchmarks/compile_bench.py: train.compile next to eager
  syncbn_bf16       SyncBatchNorm + bf16 with an empty cell (W = 2; needs 2 GPUs, else skipped)
  deterministic     train.deterministic: two runs bit-identical; halted + resumed with CUDA_VISIBLE_DEVICES=0
                    bit-identical to the uninterrupted run (a resume that sees fewer GPUs when there are several)
  host_syncs        CUDA sync debug mode ("warn") over a run: host synchronisations per iteration

    bash benchmarks/gpu_check.sh                        # on the GPU machine: writes $OUT/gpu_check.{json,md}
    python benchmarks/gpu_check.py --dry-run --out /tmp/x   # the same cells on CPU, tiny sizes (the unit test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
BF16_TOLERANCE = 0.02
"""bf16 autocast vs fp32: max over logged iterations of |loss_bf16 − loss_fp32| / loss_fp32."""
CELLS = ("nccl_init", "default_config", "lm", "bf16_vs_fp32", "compute_bound", "loops", "compile", "syncbn_bf16",
         "deterministic", "host_syncs")


# ---- children: one training run in a fresh process ----------------------------------------------------------
def _tiny_lm_raw(dry: bool) -> dict:
    """A causal LM config for when configs/examples/char_lm.yaml is missing (the child builds it itself)."""
    return {"tiny_lm": {"vocab": 64, "seq_len": 16 if dry else 128, "width": 16 if dry else 256,
                        "layers": 1 if dry else 4, "size": 256 if dry else 8192},
            "batch": {"micro_batch_size": 4 if dry else 32, "grad_accum_steps": 2}, "optim": {"name": "adamw",
                                                                                         "lr": 1e-3}}


def _tiny_lm(spec: dict):
    """Model, data and per-token loss of the fallback LM (random tokens; one TransformerEncoder block stack)."""
    import torch
    from torch import nn

    from ddp_toolkit.data import TensorData

    v, t, w = spec["vocab"], spec["seq_len"], spec["width"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, v, (spec["size"], t + 1), generator=gen)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(v, w), nn.Linear(w, v)
            layer = nn.TransformerEncoderLayer(w, 4, 4 * w, dropout=0.0, batch_first=True)
            self.blocks = nn.TransformerEncoder(layer, spec["layers"])

        def forward(self, x):
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
            return self.head(self.blocks(self.embed(x), mask=mask, is_causal=True))

    def loss_fn(logits, targets):
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")

    torch.manual_seed(0)
    return LM(), TensorData(tokens[:, :-1], tokens[:, 1:]), loss_fn


def child_train(spec: dict) -> dict:
    """Train one config at W = 1 (or as one torchrun worker); the figures of its metrics rows."""
    import torch

    from ddp_toolkit.config import apply_overrides, load_config, validate
    from ddp_toolkit.dist import DistEnv
    from ddp_toolkit.trainer import Trainer, train_from_config

    if spec.get("allow_syncbn_bf16"):  # syncbn_bf16 measures what the trainer refuses until it is proven
        import ddp_toolkit.trainer as trainer_module
        trainer_module.check_device_settings = lambda *a, **k: None
    raw = dict(spec["raw"])
    tiny = raw.pop("tiny_lm", None)
    cfg = (load_config(spec["config"], spec["overrides"]) if spec.get("config")
           else validate(apply_overrides(raw, spec["overrides"])))
    sync_mode = spec.get("sync_debug") and torch.cuda.is_available()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sync_mode:
            torch.cuda.set_sync_debug_mode("warn")
        if tiny is not None:
            model, data, loss_fn = _tiny_lm(tiny)
            summary = Trainer(model, data, cfg, loss_fn=loss_fn, count_items=lambda b: b[1].numel(),
                              env=DistEnv.from_env()).fit()
        else:
            summary = train_from_config(cfg, env=DistEnv.from_env())
        if sync_mode:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {**_row_figures(Path(cfg.run_dir)), "summary": summary,
            "host_syncs": syncs if sync_mode else None, "device": str(DistEnv.from_env().device)}


def _row_figures(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "iteration" in r]
    later = rows[1:] or rows

    def median(key: str):
        values = [r[key] for r in later if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"losses": [r["loss"] for r in rows], "iterations": rows[-1]["iteration"] if rows else 0,
            **{key: median(key) for key in ("iteration_seconds", "samples_per_second", "tokens_per_second",
                                            "flops_per_second", "mfu", "data_wait_fraction")},
            "peak_memory_mib": max((r.get("peak_memory_mib") or 0 for r in rows), default=None)}


# ---- the parent: cells ---------------------------------------------------------------------------------------
class Context:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        self.dry, self.out, self.work = args.dry_run, Path(args.out), work
        self.gpus = 0 if self.dry else torch.cuda.device_count()
        self.device = "cpu" if self.dry else "cuda"
        self.iterations = 3 if self.dry else 40

    def env(self, **extra: str) -> dict:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)]), **extra}
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
            env.pop(key, None)  # W = 1 children unless a launcher says otherwise
        return env

    def train(self, name: str, raw: dict | None = None, config: str | None = None, overrides: list[str] = (),
              timeout: float = 240, launcher: list[str] | None = None, env: dict | None = None, **flags) -> dict:
        """Run child_train in a fresh process (or under `launcher`); its result."""
        run_dir, result = self.work / name, self.work / f"{name}.json"
        overrides = [f"run_dir={run_dir}", "report.console=false", *overrides]
        raw = {**(raw or {}), "run_dir": str(run_dir), "report": {"console": False}}
        spec = {"raw": raw, "config": config, "overrides": overrides, "out": str(result), **flags}
        cmd = [*(launcher or [sys.executable]), str(Path(__file__)), "--child", json.dumps(spec)]
        done = subprocess.run(cmd, env=env or self.env(), timeout=timeout, capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        return json.loads(result.read_text())


def _stop(ctx: Context, n: int | None = None) -> list[str]:
    return [f"train.iterations={n or ctx.iterations}", "train.log_every=1"]


def cell_nccl_init(ctx: Context) -> dict:
    world = 2 if ctx.dry else min(ctx.gpus, 2)
    code = ("import os, torch, torch.distributed as d\n"
            "from ddp_toolkit.dist import DistEnv, distributed\n"
            "env = DistEnv.from_env()\n"
            "if env.world_size == 1:\n"
            "    torch.cuda.set_device(0); d.init_process_group('nccl', rank=0, world_size=1, "
            "init_method='tcp://127.0.0.1:29517', device_id=torch.device('cuda', 0))\n"
            "with distributed(env):\n"
            "    t = torch.ones(1, device=env.device); d.all_reduce(t); assert t.item() == d.get_world_size()\n"
            "    print('ok', d.get_backend(), env.device)\n")
    script = ctx.work / "nccl_init.py"
    script.write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", str(script)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=ctx.env(), timeout=120, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["?"])[-1][:300])
    return {"world_size": world, "backend": done.stdout.split()[1], "seconds": time.perf_counter() - t0}


def _lm(ctx: Context) -> tuple[dict | None, str | None]:
    path = ROOT / "configs" / "examples" / "char_lm.yaml"
    return (None, str(path)) if path.exists() and not ctx.dry else (_tiny_lm_raw(ctx.dry), None)


def cell_default_config(ctx: Context) -> dict:
    return _brief(ctx.train("default", config=str(ROOT / "configs" / "default.yaml"), overrides=_stop(ctx)))


def cell_lm(ctx: Context) -> dict:
    raw, config = _lm(ctx)
    extra = [] if ctx.dry else ["train.precision=bf16"]
    return {"config": config or "tiny LM in gpu_check.py", **_brief(ctx.train("lm", raw, config,
                                                                               _stop(ctx) + extra))}


def cell_bf16_vs_fp32(ctx: Context) -> dict:
    raw, config = _lm(ctx)
    fp32 = ctx.train("lm_fp32", raw, config, _stop(ctx) + ["train.precision=fp32", "train.tf32=false"])
    bf16 = ctx.train("lm_bf16", raw, config, _stop(ctx) + ["train.precision=bf16"] * (not ctx.dry))
    diff = max(abs(a - b) / abs(a) for a, b in zip(fp32["losses"], bf16["losses"], strict=True))
    return {"max_rel_loss_diff": diff, "tolerance": BF16_TOLERANCE, "within": diff <= BF16_TOLERANCE,
            "final_loss_fp32": fp32["losses"][-1], "final_loss_bf16": bf16["losses"][-1],
            "iteration_s_fp32": fp32["iteration_seconds"], "iteration_s_bf16": bf16["iteration_seconds"]}


def cell_compute_bound(ctx: Context) -> dict:
    size = ["data.features=32", "model.hidden=[64,64]", "batch.micro_batch_size=8"] if ctx.dry else \
        ["data.features=1024", "model.hidden=[8192,8192]", "batch.micro_batch_size=512", "train.precision=bf16"]
    over = [*size, "data.size=65536", "data.eval_size=0", "batch.global_batch_size=null", "batch.grad_accum_steps=2",
            "optim.warmup=0", *_stop(ctx, 30 if not ctx.dry else None)]
    return _brief(ctx.train("compute_bound", config=str(ROOT / "configs" / "default.yaml"), overrides=over))


def _script(ctx: Context, argv: list[str], timeout: float) -> dict:
    done = subprocess.run([sys.executable, *argv], env=ctx.env(), timeout=timeout, capture_output=True, text=True,
                          cwd=BENCH)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["?"])[-1][:300])
    return json.loads(done.stdout)


def cell_loops(ctx: Context) -> dict:
    argv = ["loop_overhead.py", "--world-size", "1", "--device", ctx.device]
    argv += ["--quick", "--cases", "overhead_bound"] if ctx.dry else [
        "--cases", "compute_bound", "--rounds", "3", "--compute-bound-micro-batch-size", "512",
        "--compute-bound-hidden", "8192", "8192", "--compute-bound-iterations", "20"]
    doc = _script(ctx, argv, 240)["results"]
    case = doc["overhead_bound" if ctx.dry else "compute_bound"]
    return {"ms_per_iteration": {k: v["median"] * 1e3 for k, v in case["seconds_per_iteration"].items()},
            "ratios_median_of_rounds": case["ratios_median_of_rounds"],
            "verification_ok": all(c["ok"] for c in doc["verification"].values())}


def cell_compile(ctx: Context) -> dict:
    argv = ["compile_bench.py"] + (["--quick"] if ctx.dry else ["--features", "1024", "--hidden", "4096", "4096",
                                                                 "--micro-batch-size", "256", "--iterations", "20"])
    r = _script(ctx, argv, 240)["results"]
    return {"eager_ms": r["eager"]["median_iteration_ms"], "compiled_ms": r["compiled"]["median_iteration_ms"],
            "compile_first_iteration_s": r["compiled"]["first_iteration_s"], "speedup": r["speedup_median"],
            "loss_max_rel_diff": r["loss_max_rel_diff"]}


def cell_syncbn_bf16(ctx: Context) -> dict:
    if ctx.dry or ctx.gpus < 2:
        return {"status": "skipped", "why": "needs 2 GPUs (torch's SyncBatchNorm refuses CPU; one rank never syncs)"}
    # N = 19, B = 16 (b 4, k 2, W 2): the short last batch of 3 leaves empty cells
    over = ["model.batchnorm=true", "train.sync_batchnorm=true", "data.size=19", "data.eval_size=0",
            "batch.micro_batch_size=4", "batch.grad_accum_steps=2", "batch.global_batch_size=null", "train.epochs=3"]
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = ctx.train(f"syncbn_{precision}", config=str(ROOT / "configs" / "default.yaml"),
                                    overrides=[*over, f"train.precision={precision}", "train.log_every=1"],
                                    launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"],
                                    allow_syncbn_bf16=True)
    diff = max(abs(a - b) / abs(a) for a, b in zip(runs["fp32"]["losses"], runs["bf16"]["losses"], strict=True))
    finite = all(x == x and abs(x) < float("inf") for x in runs["bf16"]["losses"])
    return {"finite": finite, "max_rel_loss_diff": diff, "within": finite and diff <= BF16_TOLERANCE}


def _weights(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _identical(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def cell_deterministic(ctx: Context) -> dict:
    config, n = str(ROOT / "configs" / "default.yaml"), ctx.iterations
    det = ["train.deterministic=true", *_stop(ctx), "train.checkpoint_every=1000it"]
    ctx.train("det_a", config=config, overrides=det)
    ctx.train("det_b", config=config, overrides=det)
    ctx.train("det_resume", config=config, overrides=[*det, f"train.halt_at={n // 2}"])
    fewer = ctx.env(CUDA_VISIBLE_DEVICES="" if ctx.dry else "0")
    shutil.copytree(ctx.work / "det_resume", ctx.work / "det_resumed")
    ctx.train("det_resumed", config=config, overrides=[*det, "train.resume=auto"], env=fewer)
    w = ctx.work
    return {"two_runs_identical": _identical(w / "det_a", w / "det_b"),
            "resume_identical": _identical(w / "det_a", w / "det_resumed"),
            "gpus_at_save": ctx.gpus, "gpus_at_resume": min(ctx.gpus, 1)}


def cell_host_syncs(ctx: Context) -> dict:
    over = [*_stop(ctx), "train.log_every=1000"]
    r = ctx.train("host_syncs", config=str(ROOT / "configs" / "default.yaml"), overrides=over, sync_debug=True)
    syncs = r["host_syncs"]
    return {"host_syncs": syncs, "iterations": r["iterations"],
            "per_iteration": None if syncs is None else syncs / max(r["iterations"], 1),
            "note": "CPU: not measured (sync debug mode is CUDA only)" if syncs is None else
            "one read of the gradient norm per iteration expected, plus the logged last iteration and setup"}


def _brief(r: dict) -> dict:
    keep = ("iterations", "device", "iteration_seconds", "samples_per_second", "tokens_per_second",
            "flops_per_second", "mfu", "data_wait_fraction", "peak_memory_mib")
    return {**{k: r.get(k) for k in keep}, "final_loss": r["losses"][-1] if r["losses"] else None}


# ---- driver --------------------------------------------------------------------------------------------------
def run_cells(ctx: Context, names: list[str], save) -> dict:
    """Every cell in turn; an exception is the cell's status (`failed`) with its last line, never the end.
    `save(cells)` after each cell, so a run cut short by its time limit still leaves what it measured."""
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            result = globals()[f"cell_{name}"](ctx)
            result = {"status": result.pop("status", "ok"), **result}
        except Exception as err:  # a failed cell is a finding: record it and go on
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            result = {"status": "failed", "error": last[:500]}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = result
        print(f"{name}: {result['status']} ({result['seconds']} s)", file=sys.stderr, flush=True)
        save(out)
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def markdown(document: dict) -> str:
    """One row per cell: status, seconds, and its figures."""
    lines = [f"GPU check, {document['date']}: {document['machine'].get('gpu', 'no GPU')} "
             f"({'dry run on CPU' if document['dry_run'] else 'CUDA'}), torch {document['machine']['torch']}", "",
             "| cell | status | s | figures |", "|---|---|---:|---|"]
    for name, r in document["cells"].items():
        figures = "; ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("status", "seconds"))
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {figures.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny sizes: checks the script itself")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--skip", nargs="+", choices=CELLS, default=[])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = child_train(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(spec["out"]).write_text(json.dumps(result, default=str))
        return 0
    from _common import machine

    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            parser.error("no GPU visible: run with --dry-run on CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "gpu_check", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "dry_run": args.dry_run, "machine": {**machine(), "load_average_1min": os.getloadavg()[0]},
                "bf16_tolerance": BF16_TOLERANCE, "cells": {}}

    def save(cells: dict) -> None:
        document["cells"] = cells
        (out / "gpu_check.json").write_text(json.dumps(document, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(document))

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run_cells(Context(args, Path(tmp)), [c for c in args.cells if c not in args.skip], save)
    print(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
