"""The step contract for real batch shapes, in one process: tuple batches with per-token losses and padding,
dict batches (Hugging Face style), user step functions; empty micro-batches for each; and bad workloads as one
line and exit 2 through `ddp-toolkit train` (no traceback)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ddp_toolkit.batches import empty_like
from ddp_toolkit.cli import main
from ddp_toolkit.config import validate
from ddp_toolkit.data import DataInfo, load_factory, pad_tokens, pad_tokens_dict
from ddp_toolkit.models import ByteTransformer, build_model, call_factory
from ddp_toolkit.step import (
    DictStep,
    FunctionStep,
    LossShapeError,
    TupleStep,
    cross_entropy,
    mse,
    token_cross_entropy,
)
from ddp_toolkit.workload import build_workload

SEQS = [torch.tensor([5, 9, 2, 7, 1]), torch.tensor([3, 4]), torch.tensor([8, 8, 6])]
TOKENS = sum(len(s) - 1 for s in SEQS)  # next-byte targets: 4 + 1 + 2


def lm() -> ByteTransformer:
    torch.manual_seed(0)
    return ByteTransformer(vocab_size=10, seq_len=8, width=8, layers=1, heads=2).double()


class HFStyle(nn.Module):
    """model(input_ids=..., attention_mask=...) -> an object with .logits, as Hugging Face models return."""

    def __init__(self) -> None:
        super().__init__()
        self.core = lm()

    def forward(self, input_ids, attention_mask=None):
        return types.SimpleNamespace(logits=self.core(input_ids))


def reference_token_sum(core: nn.Module) -> torch.Tensor:
    """Σ next-token losses, each sequence on its own (no padding at all)."""
    return sum(F.cross_entropy(core(s[None, :-1])[0], s[1:], reduction="sum") for s in SEQS)


def lm_step_fn(model, batch):
    inputs, targets = batch
    losses = token_cross_entropy()(model(inputs), targets)
    return losses.sum(), int((targets != -100).sum())


def count_tokens(batch) -> int:
    return int((batch[1] != -100).sum())


STEPS = {
    "tuple": (lambda: TupleStep(token_cross_entropy(), ignore_index=-100), pad_tokens, lambda m: m),
    "dict": (lambda: DictStep(causal_shift=True), pad_tokens_dict, lambda m: HFStyle()),
    "function": (lambda: FunctionStep(lm_step_fn, count=count_tokens), pad_tokens, lambda m: m),
}


@pytest.mark.parametrize("shape", STEPS)
def test_padded_token_losses_are_exact_and_padding_is_no_item(shape):
    make_step, collate, wrap = STEPS[shape]
    step, model = make_step(), wrap(lm())
    core = model.core if isinstance(model, HFStyle) else model
    batch = collate(SEQS)
    assert step.count(batch) == TOKENS and step.item_name == "tokens" and not step.counts_samples
    _, losses = step.forward(model, batch)
    torch.testing.assert_close(losses.sum(), reference_token_sum(core), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", STEPS)
def test_an_empty_micro_batch_counts_zero_and_gives_a_zero_gradient(shape):
    make_step, collate, wrap = STEPS[shape]
    step, model = make_step(), wrap(lm())
    empty = empty_like(collate(SEQS))
    assert step.count(empty) == 0
    _, losses = step.forward(model, empty)
    losses.sum().backward()
    assert float(losses.detach().sum()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_dict_step_passes_no_labels_to_the_model():
    seen = {}

    class Spy(HFStyle):
        def forward(self, **kwargs):
            seen.update(kwargs)
            return super().forward(**kwargs)

    DictStep(causal_shift=True).forward(Spy(), pad_tokens_dict(SEQS))
    assert sorted(seen) == ["attention_mask", "input_ids"]


def test_a_scalar_loss_is_refused():
    step = TupleStep(lambda out, tgt: F.cross_entropy(out, tgt))
    with pytest.raises(LossShapeError, match="returned a scalar for 3 targets"):
        step.forward(nn.Linear(4, 3), (torch.randn(3, 4), torch.tensor([0, 1, 2])))


def test_per_token_logits_with_the_per_sample_loss_is_one_clear_line():
    step = TupleStep(cross_entropy, per_sample=True)
    with pytest.raises(LossShapeError, match="token_cross_entropy") as err:
        step.forward(lm().float(), (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
    assert "\n" not in str(err.value)


def test_token_targets_of_the_wrong_length_are_refused():
    with pytest.raises(LossShapeError, match=r"\(b, T, V\) logits against \(b, T\) labels"):
        TupleStep(token_cross_entropy()).forward(lm(), (torch.zeros(2, 4, dtype=torch.long),
                                                        torch.zeros(2, 5, dtype=torch.long)))


def test_mse_is_per_sample_whatever_the_target_shape():
    step = TupleStep(mse, per_sample=True)
    batch = (torch.randn(3, 4), torch.randn(3, 2))
    assert step.count(batch) == 3 and step.counts_samples
    _, losses = step.forward(nn.Linear(4, 2), batch)
    assert losses.shape == (3,)


def test_function_step_count_must_agree_and_its_loss_must_have_a_gradient():
    batch = pad_tokens(SEQS)
    wrong = FunctionStep(lambda m, b: (lm_step_fn(m, b)[0], 99), count=count_tokens)
    with pytest.raises(LossShapeError, match="counted 99 items but count"):
        wrong.forward(lm(), batch)
    detached = FunctionStep(lambda m, b: (torch.zeros(()), 0), count=count_tokens)
    with pytest.raises(LossShapeError, match="without a gradient"):
        detached.forward(lm(), empty_like(batch))


def test_factories_get_data_info_or_the_old_two_ints():
    info = DataInfo(features=6, classes=3)
    assert call_factory(lambda in_features, num_classes: nn.Linear(in_features, num_classes), info).out_features == 3
    assert call_factory(lambda i: nn.Linear(i.features, i.classes), info).in_features == 6
    cfg = validate({"model": {"name": "mlp", "hidden": [4]}})
    assert build_model(cfg.model, 6, 3)[-1].out_features == 3  # build_model(cfg, in_features, num_classes)


def test_a_factory_in_the_working_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "my_local_model.py").write_text("def build(info):\n    return info\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_factory("my_local_model:build", "model.factory")("x") == "x"


def test_the_char_lm_workload_builds_with_token_steps():
    cfg = validate({"data": {"name": "text", "size": 8, "eval_size": 2, "seq_len": 16,
                             "collate": "ddp_toolkit.data:pad_tokens"},
                    "model": {"name": "transformer", "width": 8, "layers": 1, "heads": 2},
                    "train": {"loss": "token_cross_entropy"}})
    w = build_workload(cfg)
    batch = w.train_set.__getitems__([0, 1, 2])
    assert w.info.vocab_size == 256 and w.step.count(batch) == int((batch[1] != -100).sum())
    assert w.train_set.__getitems__([]) is None  # an empty cell: the trainer substitutes empty_like


# ---- bad workloads through the CLI: one line, exit 2 --------------------------------------------------------
def scalar_loss(info):
    return lambda outputs, targets: F.cross_entropy(outputs, targets)


def not_a_batch(samples):
    return "not a batch"


TEXT = {"name": "text", "size": 8, "eval_size": 2, "seq_len": 16, "collate": "ddp_toolkit.data:pad_tokens"}
SMALL_LM = {"name": "transformer", "width": 8, "layers": 1, "heads": 2}


@pytest.mark.parametrize(("sections", "fragment"), [
    ({"train": {"loss": "custom", "loss_factory": "tests.unit.test_step:scalar_loss", "iterations": 1}},
     "returned a scalar"),
    ({"data": TEXT, "model": SMALL_LM, "train": {"loss": "cross_entropy", "iterations": 1}},
     "train.loss=token_cross_entropy"),
    ({"model": {"name": "custom", "factory": "no_such_module_here:build"}, "train": {"iterations": 1}},
     "cannot import module 'no_such_module_here'"),
    ({"data": {**TEXT, "collate": "tests.unit.test_step:not_a_batch"}, "model": SMALL_LM,
      "train": {"loss": "token_cross_entropy", "iterations": 1}}, "returned a str batch"),
], ids=["scalar-loss", "per-token-logits-per-sample-loss", "factory-not-importable", "collate-wrong-type"])
def test_bad_workloads_are_one_line_and_exit_2(tmp_path: Path, capsys, sections, fragment):
    raw = {"run_dir": str(tmp_path / "run"), "data": {"size": 16, "eval_size": 4}, "report": {"console": False},
           **sections}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
