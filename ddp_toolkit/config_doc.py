"""The config described from its own models: `ddp-toolkit config show` (the resolved config as commented YAML) and
`ddp-toolkit config doc` / `python -m ddp_toolkit.config_doc` (docs/config.md). Descriptions are the field
docstrings in ddp_toolkit/config.py, so the code, the console and the docs say the same thing.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Iterator
from typing import Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from ddp_toolkit.config import EXCLUSIVE_GROUPS, Config, apply_overrides, load_raw, validate
from ddp_toolkit.config_types import INT64_MAX
from ddp_toolkit.text import one_line

__all__ = ["add_config_parser", "fields", "render_markdown", "render_show", "type_text", "unwrap"]

_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", "≥"), (Lt, "lt", "<"), (Le, "le", "≤"))


def fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) for every leaf setting, sections depth first, in declaration order."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def unwrap(annotation: Any, metadata: list) -> tuple[Any, list]:
    """The base type and every constraint, Annotated layers unwrapped."""
    metadata = list(metadata)
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += extra
    return annotation, metadata


def type_text(annotation: Any, metadata: list | tuple = ()) -> str:
    """A type as a reader wants it: `int > 0`, `number in [0, 1)`, `duration`, `one of sgd, adam`, `… or null`."""
    base, meta = unwrap(annotation, list(metadata))
    args = typing.get_args(base)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{type_text(rest[0], meta) if len(rest) == 1 else type_text(base.__args__[0], meta)} or null"
    if any(isinstance(m, BeforeValidator) for m in meta):
        return "duration (`500it`, `5ep`, `20000sp`)"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if typing.get_origin(base) is list:
        return f"list of {type_text(args[0])}"
    if typing.get_origin(base) is tuple:
        return f"pair of {type_text(args[0])}"
    name = {int: "int", float: "number", bool: "bool", str: "text"}.get(base, getattr(base, "__name__", str(base)))
    bounds = []
    for kind, attr, sign in _BOUNDS:
        for m in meta:
            value = getattr(m, attr, None) if isinstance(m, kind) else None
            if value is not None and abs(value) < INT64_MAX:
                bounds.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value:g}")
    return f"{name} {' and '.join(bounds)}".strip()


def _scalar(value: Any) -> str:
    """A value as YAML flow text: `null`, `true`, `[64]`, `runs/default`, `'1e-3'`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("...\n").strip()


def _description(field: FieldInfo) -> str:
    return one_line(field.description or "")


def render_show(cfg: Config) -> str:
    """The resolved config as YAML that loads back to the same config, each key with its description."""
    data = cfg.model_dump(mode="json")
    lines: list[str] = []
    for name, field in Config.model_fields.items():
        if isinstance(data[name], dict):
            lines.append(f"{name + ':':<34} # {_description(field)}")
            for key, sub in field.annotation.model_fields.items():  # type: ignore[union-attr]
                lines.append(f"  {f'{key}: {_scalar(data[name][key])}':<32} # {_description(sub)}")
        else:
            lines.append(f"{f'{name}: {_scalar(data[name])}':<34} # {_description(field)}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/config.md: every key with type, default and description; the exclusive groups; the plan JSON keys."""
    from ddp_toolkit.plan_report import PLAN_FIELDS

    lines = ["# Config reference", "",
             "Generated from the models in `ddp_toolkit/config.py` by `ddp-toolkit config doc > docs/config.md`;",
             "a test fails when this file is out of date. `ddp-toolkit config show [CONFIG] [key.path=value ...]`",
             "prints a resolved config with the same descriptions.", ""]
    section = None
    for key, field in fields():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            title = f"`{head}`: {_description(Config.model_fields[head])}" if head else "top level"
            lines += ["", f"## {title}", "", "| key | type | default | description |", "|---|---|---|---|"]
        default = _scalar(field.get_default(call_default_factory=True))
        default = _scalar(list(default)) if isinstance(default, tuple) else default
        lines.append(f"| `{key}` | {_cell(type_text(field.annotation, field.metadata))} | `{_cell(default)}` | "
                     f"{_cell(_description(field))} |")
    groups = "; ".join(" / ".join(f"`{section}.{k}`" for k in keys) for section, keys in EXCLUSIVE_GROUPS.items())
    lines += ["", "## Keys that exclude each other", "",
              f"{groups}: only one is set; the last one given wins — the file in document order, then the "
              f"command-line overrides in order (so `train.iterations=20` on the command line replaces the file's "
              f"`train.epochs`).", "",
              "## `ddp-toolkit plan --json`", "", "| key | meaning |", "|---|---|"]
    lines += [f"| `{key}` | {_cell(text)} |" for key, text in PLAN_FIELDS.items()]
    return "\n".join(lines) + "\n"


def add_config_parser(sub: argparse._SubParsersAction) -> None:
    """`ddp-toolkit config show [CONFIG] [key.path=value ...]` and `ddp-toolkit config doc`."""
    from ddp_toolkit.cli_types import IntermixedParser

    p = sub.add_parser("config", help="show a resolved config with every key's description; write the docs")
    actions = p.add_subparsers(dest="config_command", required=True, parser_class=IntermixedParser)
    show = actions.add_parser("show", help="the resolved config (defaults filled in) as commented YAML")
    show.add_argument("inputs", nargs="*", metavar="[CONFIG] [key.path=value ...]",
                      help="a YAML config and overrides (default: the config defaults)")
    show.set_defaults(func=_cmd_show)
    doc = actions.add_parser("doc", help="print docs/config.md (the reference of every key)")
    doc.set_defaults(func=lambda args: _print(render_markdown()))


def _print(text: str) -> int:
    sys.stdout.write(text)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from ddp_toolkit.cli_types import split_config_inputs

    path, overrides = split_config_inputs(args.inputs)
    raw = load_raw(path) if path is not None else {}
    return _print(render_show(validate(apply_overrides(raw, overrides))))


if __name__ == "__main__":
    sys.exit(_print(render_markdown()))
