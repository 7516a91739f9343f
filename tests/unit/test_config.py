"""Config: YAML through safe_load, overrides, one-line errors naming key, value and what is allowed."""

import pytest

from ddp_toolkit.config import DEFAULT_CONFIG, ConfigError, apply_overrides, load_config, validate
from ddp_toolkit.duration import Duration


def test_default_config_loads():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.batch.global_batch_size == 128 and cfg.batch.micro_batch_size == 16
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
    ({"optim": {"lr": float("nan")}}, ["optim.lr", "finite"]),
    ({"optim": {"lr": True}}, ["optim.lr", "valid number"]),
    ({"batch": {"micro_batch_size": 4.0}}, ["batch.micro_batch_size", "valid integer"]),
    ({"batch": {"micro_batch_size": "8"}}, ["batch.micro_batch_size", "valid integer"]),
    ({"train": {"seed": -1}}, ["train.seed", "-1"]),
    ({"train": {"seed": 2**40}}, ["train.seed", "less than or equal"]),
    ({"model": {"hidden": [-4]}}, ["model.hidden.0", "-4"]),
    ({"optim": {"betas": [0.9, 1.0]}}, ["optim.betas.1", "less than 1"]),
    ({"optim": {"warmup": True}}, ["optim.warmup", "duration"]),
    ({"run_dir": "a\x00b"}, ["run_dir"]),
    ({"optim": {"lr": "x" * 10_000}}, ["optim.lr", "..."]),
    ({"data": {"name": "custom"}}, ["data.factory"]),
])
def test_bad_configs_are_one_clear_line(raw, fragments):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
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


def test_last_run_length_given_wins():
    assert validate({"train": {"iterations": 10, "epochs": 2}}).train.stop == Duration.epochs(2)
    assert validate({"train": {"epochs": 2, "iterations": 10}}).train.stop == Duration.iterations(10)
    cfg = load_config(DEFAULT_CONFIG, ["train.iterations=20"])  # the file says epochs: 3
    assert cfg.train.stop == Duration.iterations(20) and cfg.train.epochs is None
    cfg = load_config(DEFAULT_CONFIG, ["train.iterations=20", "train.samples=640"])
    assert cfg.train.stop == Duration.samples(640)
    cfg.train.epochs = 1.5  # assignment is the newest input too
    assert cfg.train.stop == Duration.epochs(1.5) and cfg.train.samples is None


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        validate({"optim": {"lrr": 0.1}})


def test_yaml_floats_in_exponent_form_and_durations(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  eps: 1E-8\n  warmup: 2ep\n")
    cfg = load_config(path, ["optim.min_lr=1e-5"])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.min_lr, cfg.optim.warmup) == (1e-3, 1e-8, 1e-5, "2ep")


def test_duplicate_keys_and_non_utf8_are_one_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' at lines 2 and 3"):
        load_config(dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(latin)


def test_every_key_has_a_description():
    from ddp_toolkit.config_doc import fields

    missing = [key for key, field in fields() if not field.description]
    assert not missing
