"""Config: YAML through safe_load, overrides, one-line errors naming key, value and what is allowed."""

import pytest

from ddp_toolkit.duration import Duration
from ddp_toolkit.config import DEFAULT_CONFIG, ConfigError, apply_overrides, load_config, validate


def test_default_config_loads():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.batch.global_batch_size == 128 and cfg.batch.micro_batch_size == 32
    assert cfg.train.stop == Duration.epochs(3)


def test_overrides_reach_nested_keys_with_yaml_types():
    cfg = load_config(DEFAULT_CONFIG, ["optim.lr=0.5", "model.hidden=[16, 16]", "train.iterations=7",
                                       "train.epochs=null", "batch.drop_last=true", "optim.warmup=2ep"])
    assert cfg.optim.lr == 0.5 and cfg.model.hidden == [16, 16] and cfg.batch.drop_last is True
    assert cfg.train.stop == Duration.iterations(7) and cfg.optim.warmup == "2ep"


def test_overrides_do_not_mutate_input():
    raw = {"optim": {"lr": 0.1}}
    apply_overrides(raw, ["optim.lr=0.2"])
    assert raw == {"optim": {"lr": 0.1}}


@pytest.mark.parametrize(("raw", "fragments"), [
    ({"optim": {"lrr": 0.1}}, ["unknown key", "optim.lrr"]),
    ({"bogus": 1}, ["unknown key", "bogus"]),
    ({"optim": {"lr": "fast"}}, ["optim.lr", "fast"]),
    ({"optim": {"lr": -0.1}}, ["optim.lr", "greater than 0", "-0.1"]),
    ({"batch": {"micro_batch_size": 0}}, ["batch.micro_batch_size", "0"]),
    ({"batch": {"micro_batch_size": 24, "global_batch_size": 500}},
     ["batch.global_batch_size 500", "batch.micro_batch_size 24"]),
    ({"batch": {"micro_batch_size": 8, "grad_accum_steps": 3, "global_batch_size": 64}},
     ["global_batch_size 64", "grad_accum_steps 3"]),
    ({"train": {"engine": "horovod"}}, ["train.engine", "horovod", "'ddp'"]),
    ({"optim": {"lr_scaling": "cubic"}}, ["optim.lr_scaling", "cubic", "'linear'"]),
    ({"optim": {"warmup": "5 weeks"}}, ["optim.warmup", "5 weeks", "5ep"]),
    ({"train": {"epochs": 2, "iterations": 10}}, ["only one of", "epochs", "iterations"]),
    ({"data": {"name": "custom"}}, ["data.factory"]),
])
def test_bad_configs_are_one_clear_line(raw, fragments):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listing)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_bad_override_form():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(DEFAULT_CONFIG, ["optim.lr"])
