"""The DeepSpeed config derived from the batch plan, and every refusal as one line (no DeepSpeed import)."""

from __future__ import annotations

import json

import pytest

from ddp_toolkit.config import ConfigError, validate
from ddp_toolkit.engines.deepspeed import DeepSpeedConfigError, deepspeed_config, load_user_config
from ddp_toolkit.plan import BatchPlan

PLAN = BatchPlan(dataset_size=1000, micro_batch_size=8, world_size=2, grad_accum_steps=2)  # B = 32


def cfg(**train):
    return validate({"optim": {"name": train.pop("optim", "sgd"), "grad_clip": train.pop("grad_clip", None)},
                     "train": {"engine": "deepspeed", **train}})


def refusal(user: dict, config=None) -> str:
    with pytest.raises(DeepSpeedConfigError) as info:
        deepspeed_config(PLAN, config or cfg(), user, "'ds.json'")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ConfigError)  # the CLI prints ConfigError, exit 2
    return message


def test_plan_fills_in_the_batch_numbers_stage_and_clipping():
    out = deepspeed_config(PLAN, cfg(zero_stage=1, grad_clip=1.5))
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) \
        == (32, 8, 2)
    assert out["zero_optimization"] == {"stage": 1}
    assert out["gradient_clipping"] == 1.5 and out["zero_allow_untested_optimizer"] is True


def test_mismatched_train_batch_size_is_one_line_naming_both_sides():
    message = refusal({"train_batch_size": 64})
    assert "train_batch_size 64 vs plan b=8 × k=2 × W=2 = 32" in message
    assert "set train_batch_size 32, train_micro_batch_size_per_gpu 8, gradient_accumulation_steps 2" in message


def test_each_batch_key_is_checked_and_every_mismatch_named():
    message = refusal({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4})
    assert "train_micro_batch_size_per_gpu 4 vs plan b=8" in message
    assert "gradient_accumulation_steps 4 vs plan k=2" in message
    assert "train_batch_size 32 vs" not in message  # that one agrees


def test_matching_or_auto_batch_keys_are_accepted_and_user_keys_kept():
    user = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 2, "overlap_comm": False}, "wall_clock_breakdown": False}
    out = deepspeed_config(PLAN, cfg(), user)
    assert out["train_micro_batch_size_per_gpu"] == 8
    assert out["zero_optimization"] == {"stage": 2, "overlap_comm": False}  # stage from the JSON
    assert out["wall_clock_breakdown"] is False
    assert user["train_micro_batch_size_per_gpu"] == "auto"  # the user's dict is not modified


def test_zero_stage_conflict_and_stage_3_are_refused():
    assert "zero_optimization.stage 2 but train.zero_stage is 1" in refusal({"zero_optimization": {"stage": 2}},
                                                                            cfg(zero_stage=1))
    assert deepspeed_config(PLAN, cfg(), {"zero_optimization": {"stage": 3}})["zero_optimization"] == {"stage": 3}
    assert "ZeRO stage 4 is not supported" in refusal({"zero_optimization": {"stage": 4}})
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert "zero_optimization.offload_param.device 'cpu'" in refusal(offload)


@pytest.mark.parametrize(("user", "expected"), [
    ({"optimizer": {"type": "Adam"}}, "has a 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
    ({"bf16": {"enabled": True}}, "enables bf16"),
    ({"gradient_clipping": 1.0}, "gradient_clipping 1.0 but optim.grad_clip is None"),
])
def test_settings_that_would_change_the_run_are_refused(user, expected):
    assert expected in refusal(user)


def test_per_tensor_optimizers_are_refused_with_zero():
    assert "per-tensor trust ratios" in refusal({}, cfg(zero_stage=1, optim="lars"))
    assert deepspeed_config(PLAN, cfg(zero_stage=0, optim="lars"))["zero_optimization"] == {"stage": 0}


def test_user_json_missing_or_invalid_is_one_line(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="cannot read train.deepspeed_config"):
        load_user_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="is not valid JSON"):
        load_user_config(str(tmp_path / "bad.json"))
    (tmp_path / "ok.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert load_user_config(str(tmp_path / "ok.json"))[0] == {"zero_optimization": {"stage": 1}}
    assert load_user_config(None) == ({}, "(derived)")


def test_example_configs_agree_with_any_plan():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
    for name, stage in (("zero1.json", 1), ("zero2.json", 2)):
        user, source = load_user_config(str(root / name))
        assert deepspeed_config(PLAN, cfg(), user, source)["zero_optimization"]["stage"] == stage
