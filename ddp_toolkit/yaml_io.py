"""YAML for configs: `yaml.safe_load` semantics, plus duplicate keys refused and `1e-3` read as a number.

PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a config author means a float, as YAML 1.2 does.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from ddp_toolkit.text import shown

__all__ = ["YamlError", "parse_yaml"]


class YamlError(ValueError):
    """Text that is not usable YAML; str() is a suffix for a message: ` at line 3` or `: duplicate key ...`."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping and reads YAML 1.2 exponent floats."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader's own error names the unhashable key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlError(f": duplicate key {shown(key)} at lines {seen[key]} and {line}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text safely; a problem is one YamlError naming the line where possible."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except YamlError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise YamlError(f" at line {mark.line + 1}" if mark else "") from None
    except RecursionError:
        raise YamlError(": nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise YamlError(f": {shown(str(err))}") from None
