"""Trackers and throughput in one process: FLOPs against hand formulas, MFU only with a known peak, a failing
tracker disabled with one warning, TensorBoard purging redone steps, tracker files moved aside by a fresh run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddp_toolkit import flops, models
from ddp_toolkit.batch_schedule import Position
from ddp_toolkit.config import validate
from ddp_toolkit.metrics import IterationResult, MetricsLogger
from ddp_toolkit.plan import BatchPlan
from ddp_toolkit.progress import Progress
from ddp_toolkit.rundir import archive_previous_run
from ddp_toolkit.sinks import TensorBoardSink, TrackerIds, WandbSink, flatten, numeric_fields, open_sinks
from ddp_toolkit.step import TupleStep


# ---- FLOPs -----------------------------------------------------------------------------------------------------
def test_flops_of_a_linear_stack_match_2mnk_per_matmul_times_3_with_backward():
    widths, batch = [32, 64, 48, 10], 16
    model = models.mlp(widths[0], widths[-1], widths[1:-1]).double()
    x, y = torch.randn(batch, widths[0], dtype=torch.float64), torch.randint(0, widths[-1], (batch,))
    counted = flops.count_micro_step_flops(model, TupleStep(), (x, y))
    per_layer = [2 * batch * m * n for m, n in zip(widths, widths[1:], strict=False)]
    # forward 2mnk; backward 2mnk for the weight gradient and 2mnk for the input gradient, which the first
    # layer does not need (its input is data): 3× per layer, 2× for the first
    expected = 2 * per_layer[0] + 3 * sum(per_layer[1:])
    assert counted == pytest.approx(expected, rel=0.05)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _lm_flops(batch: int, length: int, d: int, ff: int, layers: int, vocab: int) -> int:
    """Per layer: QKV and output projections 2·N·4d², MLP 2·N·2·d·ff, attention scores and mix 4·B·T²·d; the head
    2·N·d·V; ×3 with backward (every matmul input needs a gradient: the embedding is trained)."""
    n = batch * length
    per_layer = 2 * n * 4 * d * d + 2 * n * 2 * d * ff + 4 * batch * length * length * d
    return 3 * (layers * per_layer + 2 * n * d * vocab)


def test_flops_of_a_small_transformer_lm_match_the_hand_formula():
    batch, length, d, heads, ff, layers, vocab = 4, 24, 32, 4, 64, 2, 50
    model = _TinyLM(vocab, d, heads, ff, layers)
    ids = torch.randint(0, vocab, (batch, length))
    counted = flops.count_micro_step_flops(model, TupleStep(_token_loss), (ids, ids))
    assert counted == pytest.approx(_lm_flops(batch, length, d, ff, layers, vocab), rel=0.05)


def _token_loss(logits, targets):
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def test_flops_of_the_built_in_transformer_match_the_hand_formula():
    if not hasattr(models, "ByteTransformer"):
        pytest.skip("models.py has no transformer yet")
    batch, length, d, layers, vocab = 2, 16, 32, 2, 256
    model = models.ByteTransformer(vocab, length, d, layers, 4)
    ids = torch.randint(0, vocab, (batch, length))
    counted = flops.count_micro_step_flops(model, TupleStep(_token_loss), (ids, ids))
    assert counted == pytest.approx(_lm_flops(batch, length, d, 4 * d, layers, vocab), rel=0.05)


def test_counting_touches_neither_weights_grads_buffers_nor_rng():
    model = models.mlp(8, 3, [16], batchnorm=True).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    rng = torch.get_rng_state()
    flops.count_micro_step_flops(model, TupleStep(), (x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())


def test_peak_flops_known_gpus_an_override_and_none_on_cpu(monkeypatch):
    assert flops.peak_flops_of(torch.device("cpu")) is None
    assert flops.peak_flops_of(torch.device("cpu"), 1e12) == 1e12
    for name, peak in (("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert flops.peak_flops_of(torch.device("cuda", 0)) == peak, name


# ---- throughput, MFU and the time breakdown in rows -----------------------------------------------------------
class _Reporter:
    def __init__(self, peak: float | None) -> None:
        self.cfg = validate({"report": {"peak_flops": peak}})
        self.env, self.enabled, self.rows, self.warnings = SimpleNamespace(device=torch.device("cpu")), True, [], []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _logged_row(peak: float | None) -> dict:
    reporter, progress = _Reporter(peak), Progress()
    logger = MetricsLogger(reporter, BatchPlan(64, 8, 2, grad_accum_steps=1), progress, every=1)
    model = models.mlp(4, 2, [8]).double()
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,)))
    logger.count_flops(model, TupleStep(), [batch], [8])
    assert not logger.wants_flops and logger.flops_per_item == (2 * 8 * 4 * 8 * 2 + 3 * 2 * 8 * 8 * 2) / 8
    progress.advance(Position(1, 0, 16, 16), 16, False)
    result = IterationResult(samples=16, items=16, item_losses=[torch.ones(8)], grad_norm=1.0, hparams={"lr": 0.1},
                             comm=(1, 1, 8, 0, 0), seconds=0.5, data_seconds=0.1, compute_seconds=0.3, step_seconds=0.1)
    return logger.log(result, loss_sum=16.0)


def test_rows_have_flops_per_second_and_mfu_only_with_a_peak():
    row = _logged_row(peak=None)
    assert row["flops_per_iteration"] == 16 * (2 * 8 * 4 * 8 * 2 + 3 * 2 * 8 * 8 * 2) / 8
    assert row["flops_per_second"] > 0 and "mfu" not in row and "tokens_per_second" not in row
    assert (row["data_seconds"], row["compute_seconds"], row["optimizer_seconds"]) == (0.1, 0.3, 0.1)
    assert row["peak_memory_mib"] > 10
    with_peak = _logged_row(peak=1e9)
    assert with_peak["mfu"] == pytest.approx(with_peak["flops_per_second"] / (1e9 * 2))  # W = 2 devices


# ---- sinks -------------------------------------------------------------------------------------------------------
def test_numeric_fields_and_flattened_parameters():
    row = {"kind": "train", "iteration": 3, "loss": 0.5, "samples_per_second": None, "lr": 0.1, "engine": "ddp"}
    assert numeric_fields(row) == {"loss": 0.5, "lr": 0.1}
    assert numeric_fields({"kind": "eval", "iteration": 4, "epoch": 1.0, "eval_loss": 0.3}) == {"eval_loss": 0.3}
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def _cfg(run_dir, **report):
    return validate({"run_dir": str(run_dir), "report": {"console": False, **report}})


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    warnings: list[str] = []
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # `import wandb` fails
    assert WandbSink.open(_cfg(tmp_path, wandb=True), {}, warnings.append, TrackerIds(tmp_path)) is None
    assert len(warnings) == 1 and warnings[0].startswith("wandb disabled")

    class Broken:
        def add_scalar(self, *args):
            raise OSError(28, "No space left on device")

    sink = TensorBoardSink(Broken(), Broken(), warnings.append)
    for it in range(1, 4):
        sink.log({"kind": "train", "iteration": it, "loss": 1.0, "samples_seen": 8 * it})
    sink.summary({"final_loss": 1.0})
    assert len(warnings) == 2 and "tensorboard log failed" in warnings[1] and "No space left" in warnings[1]


def test_tensorboard_resume_purges_the_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tests.distributed.test_observability import tensorboard_scalars

    cfg = _cfg(tmp_path, tensorboard=True)

    def run(start: int, stop: int, offset: float) -> None:
        (sink,) = open_sinks(cfg, {"global_batch_size": 8}, print, (start, 8 * start))
        for it in range(start + 1, stop + 1):
            sink.log({"kind": "train", "iteration": it, "loss": offset + it, "samples_seen": 8 * it})
        sink.close()

    run(0, 5, 0.0)  # a crash after iteration 5, last checkpoint at iteration 3: 4 and 5 are redone
    run(3, 6, 100.0)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    by_samples = tensorboard_scalars(tmp_path / "tensorboard" / "by_samples")["loss_vs_samples"]
    assert [s for s, _ in by_samples] == [8, 16, 24, 32, 40, 48]


def test_a_fresh_run_moves_the_tracker_files_aside_so_it_gets_new_tracker_runs(tmp_path):
    TrackerIds(tmp_path).set("wandb", "abc123")
    for name in ("tensorboard", "wandb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "events").write_text("x")
    (tmp_path / "mlflow.db").write_text("db")
    moved = archive_previous_run(tmp_path)
    assert {p.name for p in moved} == {"trackers.json", "tensorboard", "wandb", "mlflow.db"}
    assert TrackerIds(tmp_path).get("wandb") is None
    assert json.loads((moved[0].parent / "trackers.json").read_text()) == {"wandb": "abc123"}
