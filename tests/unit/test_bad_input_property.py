"""Every input is one line: bad values for every config key (walked from the pydantic models) and for every flag of
`plan`, `slurm` and `launch` (walked from the parser) exit 2 with one line on stderr, no traceback, nothing written.

In-process through `ddp_toolkit.cli.main` (no torch import); whatever would start work is replaced by a stub that
fails the test, so a value that slips through validation cannot train, launch or submit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import pytest
from annotated_types import Ge, Gt, Le, Lt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, BeforeValidator

from ddp_toolkit import cli
from ddp_toolkit.cli_types import Count, DurationArg, Endpoint, NodeRange, Number, OneLine
from ddp_toolkit.config_doc import fields, unwrap

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HUGE = "9" * 5000
NOT_NUMBERS = ["true", "false", "abc", "'7'", "[1]", "{a: 1}", "null", "x" * 5000]
NOT_TEXT = ["1", "1.5", "true", "[a]", "{a: 1}"]


def _bounds(meta: list) -> tuple[float | None, float | None]:
    low = next((m.gt if isinstance(m, Gt) else m.ge for m in meta if isinstance(m, (Gt, Ge))), None)
    high = next((m.lt if isinstance(m, Lt) else m.le for m in meta if isinstance(m, (Lt, Le))), None)
    return low, high


def _numbers_outside(meta: list, integer: bool) -> list[str]:
    low, high = _bounds(meta)
    out = [] if low is None else [str(low if any(isinstance(m, Gt) for m in meta) else low - 1), str(low - 10**6)]
    out += [] if high is None else [str(high + 1)]
    return out + ([HUGE, "1.5", ".nan"] if integer else [".nan", ".inf", "-.inf", "1e999"])


def _bad_text(meta: list) -> list[str]:
    """Strings that break a pattern, a minimum or a maximum length of the field (as YAML, JSON-quoted)."""
    out = []
    for m in meta:
        if getattr(m, "pattern", None):
            out += [json.dumps(t) for t in ("has space:x", "nocolon", "a\x00b", "") if not re.fullmatch(m.pattern, t)]
        if getattr(m, "min_length", None):
            out.append("''")
        if getattr(m, "max_length", None):
            out.append("x" * (m.max_length + 1))
    return out


def bad_yaml(annotation, metadata, nullable: bool = False) -> list[str]:
    """YAML texts that the type cannot accept, derived from the annotation and its constraints."""
    base, meta = unwrap(annotation, list(metadata))
    args = typing.get_args(base)
    if type(None) in args:  # null is fine here; everything else must still be refused
        return bad_yaml(next(a for a in args if a is not type(None)), meta, nullable=True)
    if any(isinstance(m, BeforeValidator) for m in meta):
        return ["5 weeks", "-1", "true", "1.5", "1.5it", "[1]", ".nan", "x" * 5000]
    if typing.get_origin(base) is Literal:
        return ["nope", "1", "true", "[a]", json.dumps("x" * 5000), json.dumps(str(args[0]).upper() + "!")]
    if typing.get_origin(base) is list:
        return ["abc", "5", "{a: 1}"] + [f"[{v}]" for v in bad_yaml(args[0], []) if not v.startswith(("[", "{"))]
    if typing.get_origin(base) is tuple:
        return ["abc", "[0.9]", "[0.9, 0.9, 0.9]"] + [f"[{v}, 0.5]" for v in bad_yaml(args[0], [])
                                                      if not v.startswith(("[", "{"))]
    if base is bool:
        return ["2", "1.5", "abc", "'true'", "[true]"] + ["null"] * (not nullable)
    if base is int:
        return NOT_NUMBERS + _numbers_outside(meta, integer=True)
    if base is float:
        return NOT_NUMBERS + _numbers_outside(meta, integer=False)
    if base is str:
        return NOT_TEXT + _bad_text(meta) + ["null"] * (not nullable)
    if isinstance(base, type) and issubclass(base, BaseModel):  # a nested section (a batch phase, the ramp)
        return ["abc", "5", "{}", "{nope: 1}"] + [f"{{{name}: {v}}}" for name, f in base.model_fields.items()
                                                  for v in bad_yaml(f.annotation, f.metadata)[:3]
                                                  if not v.startswith(("[", "{"))]
    raise AssertionError(f"no bad values known for {base!r}: extend bad_yaml")


KEYS = {key: bad_yaml(field.annotation, field.metadata) for key, field in fields()}


def generated(annotation, metadata) -> st.SearchStrategy[str]:
    """Generated bad values on top of the listed ones: numbers out of range, text outside a Literal's choices."""
    base, meta = unwrap(annotation, list(metadata))
    args = [a for a in typing.get_args(base) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(base) is not Literal and typing.get_origin(base) is not list:
        return generated(args[0], meta)
    if typing.get_origin(base) is Literal:
        return st.text(min_size=1, max_size=30).filter(lambda t: t not in args).map(json.dumps)
    low, high = _bounds(meta)
    inclusive_low = not any(isinstance(m, Gt) for m in meta)
    if base in (int, float) and low is not None:
        top = low - 1 if inclusive_low else low
        numbers = st.integers(max_value=int(top)) if base is int else \
            st.floats(max_value=low, exclude_max=inclusive_low, allow_nan=False, allow_infinity=False)
        return numbers.map(repr)
    if base is bool:
        return st.integers().map(str)
    return st.nothing()


GENERATED = {key: generated(field.annotation, field.metadata) for key, field in fields()}


def draw_bad(data) -> tuple[str, str]:
    """A config key and a YAML value it must refuse."""
    key = data.draw(st.sampled_from(sorted(KEYS)), label="key")
    return key, data.draw(st.sampled_from(KEYS[key]) | GENERATED[key], label="value")


@pytest.fixture
def isolated(tmp_path, monkeypatch, capsys):
    """A config file in tmp_path; training, launching and submitting replaced by stubs that fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("bad input reached the point of starting work")

    monkeypatch.setitem(sys.modules, "ddp_toolkit.trainer", types.SimpleNamespace(train_from_config=refuse,
                                                                                  preflight=refuse))
    monkeypatch.setitem(sys.modules, "ddp_toolkit.recipe", types.SimpleNamespace(train_from_config=refuse,
                                                                                 preflight=refuse))
    import ddp_toolkit.launcher
    import ddp_toolkit.slurm

    monkeypatch.setattr(ddp_toolkit.slurm, "write_and_submit", refuse)
    for name in ("launch", "torchrun_command"):
        if hasattr(ddp_toolkit.launcher, name):
            monkeypatch.setattr(ddp_toolkit.launcher, name, refuse)
    monkeypatch.setattr("subprocess.call", refuse)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # slurm submit wants the repository root
    config = tmp_path / "cfg.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{size: 64}}\n")
    return tmp_path, config


def assert_one_line_refusal(argv: list[str], tmp_path: Path, capsys) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err and len(lines[0]) < 500, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, f"{argv} wrote into {tmp_path}"


@SETTINGS
@given(data=st.data())
def test_bad_value_for_any_config_key_via_override(isolated, capsys, data):
    tmp_path, config = isolated
    key, value = draw_bad(data)
    assert_one_line_refusal(["train", str(config), f"{key}={value}"], tmp_path, capsys)


@SETTINGS
@given(data=st.data())
def test_bad_value_for_any_config_key_in_the_file(isolated, capsys, data):
    tmp_path, _ = isolated
    key, value = draw_bad(data)
    section, _, name = key.rpartition(".")
    text = f"{section}:\n  {name}: {value}\n" if section else f"{name}: {value}\n"
    path = tmp_path / "bad.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\n" * (key != "run_dir") + text, encoding="utf-8")
    assert_one_line_refusal(["config", "show", str(path)], tmp_path, capsys)
    assert_one_line_refusal(["train", str(path)], tmp_path, capsys)


def test_every_key_has_bad_values():
    assert all(len(values) >= 4 for values in KEYS.values())
    assert {"optim.lr", "optim.betas", "model.hidden", "train.seed", "optim.warmup", "run_dir"} <= set(KEYS)


# ---- command-line flags ----------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))
    if path:
        yield path, parser


def bad_flag_values(action: argparse.Action) -> list[str] | None:
    """Values the flag must refuse, from its declared converter or choices; None when it declares neither."""
    kind = action.type
    if action.choices is not None:
        return ["nope", "", "x" * 5000, "NONE"]
    if isinstance(kind, Count):
        return ["abc", "1.5", "nan", "inf", "true", "", " ", "1e3", str(kind.minimum - 1), str(kind.maximum + 1), HUGE]
    if isinstance(kind, Number):
        return ["nan", "inf", "-inf", "1e999", "abc", "true", "", "-1", "x" * 5000] + \
            ([] if kind.inclusive else [str(kind.minimum)])
    if isinstance(kind, OneLine):
        return ["", "a\nb", "a\x00b", "x" * (kind.maximum + 1)] + (["!!bad value!!"] if kind.pattern else [])
    if isinstance(kind, DurationArg):
        return ["5 weeks", "-1", "0", "0ep", "nan", "1.5it", "", "x" * 5000]
    if isinstance(kind, NodeRange):
        return ["abc", "0", "2:1", "1.5", "-1", "", "1:abc"]
    if isinstance(kind, Endpoint):
        return ["abc", "host:0", "host:99999", ":80", "", "a b:80"]
    return None


def _argv(path: tuple, action: argparse.Action, value: str, config: Path) -> list[str]:
    flag = f"{action.option_strings[-1]}={value}" if action.option_strings else value
    return {("plan",): ["plan", "--dataset-size", "100", "--micro-batch-size", "8", flag],
            ("launch",): ["launch", flag, str(config)],
            ("slurm", "submit"): ["slurm", "submit", str(config), "--dry-run", flag],
            ("slurm", "status"): ["slurm", "status", flag],
            ("slurm", "cancel"): ["slurm", "cancel", flag] if not action.option_strings
            else ["slurm", "cancel", "7", flag]}[path]


FLAG_COMMANDS = {("plan",), ("launch",), ("slurm", "submit"), ("slurm", "status"), ("slurm", "cancel")}
FLAGS = [(path, action) for path, parser in _subparsers(cli.build_parser()) if path in FLAG_COMMANDS
         for action in parser._actions
         if action.nargs != 0 and not isinstance(action, argparse._HelpAction)
         and action.dest not in ("config", "overrides", "inputs")]


FLAG_IDS = [f"{' '.join(p)} {a.option_strings[-1] if a.option_strings else a.dest}" for p, a in FLAGS]


@pytest.mark.parametrize(("path", "action"), FLAGS, ids=FLAG_IDS)
def test_bad_value_for_any_flag(isolated, capsys, path, action):
    values = bad_flag_values(action)
    if values is None:
        pytest.xfail(f"{' '.join(path)} {action.option_strings or action.dest} declares no value type: use a "
                     f"ddp_toolkit.cli_types converter")
    tmp_path, config = isolated

    @SETTINGS
    @given(value=st.sampled_from(values))
    def check(value):
        assert_one_line_refusal(_argv(path, action, value, config), tmp_path, capsys)

    check()
