"""Strict, safe YAML reading shared by every config file of the project.

PyYAML's SafeLoader is the base (no object construction), with three changes:
duplicate keys are an error (the default silently keeps the last one), `1e-4`
reads as a float (YAML 1.1 wants a dot: `1.0e-4`), and documents that are huge
or expand through many aliases (the "billion laughs" bomb) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError, Problem

MAX_BYTES = 1_000_000  # a config is a few KiB; anything near this is not a config
MAX_ALIASES = 100  # legitimate configs use a handful of anchors at most

# YAML 1.2's float form, which also accepts `1e-4` and `5E3` without a dot.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and alias bombs."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {MAX_ALIASES} aliases (alias bomb?)", mark
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found an unhashable key (a list or mapping used as a key)",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# Replace the YAML 1.1 float resolver with the 1.2 one on our loader only.
StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text strictly; a problem raises ConfigError naming `source`."""
    if len(text.encode()) > MAX_BYTES:
        raise ConfigError([Problem(source, "", f"file is larger than {MAX_BYTES} bytes",
                                   "a config is a few KiB; check the path")])
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError([Problem(where, "", f"invalid YAML: {what}",
                                   "fix the YAML syntax at that position")]) from None
    except yaml.YAMLError as e:
        problem = Problem(source, "", f"invalid YAML: {e}", "fix the YAML syntax")
        raise ConfigError([problem]) from None


def load_yaml_file(path: str | Path) -> Any:
    """Read and strictly parse a YAML file; a missing file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([Problem(str(p), "", "file not found", "check the path")])
    if p.stat().st_size > MAX_BYTES:
        raise ConfigError([Problem(str(p), "", f"file is larger than {MAX_BYTES} bytes",
                                   "a config is a few KiB; check the path")])
    return parse_yaml(p.read_text(encoding="utf-8"), str(p))


def parse_scalar(text: str) -> Any:
    """Parse a `--set key=value` value with the same rules as a YAML file."""
    return parse_yaml(text, "--set") if text.strip() else ""


def dump_yaml(data: Any) -> str:
    """Dump plain data as YAML that StrictLoader reads back to the same values."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
