"""Strict, safe YAML reading shared by every config file of the project.

PyYAML's SafeLoader is the base (no object construction), with these changes:
duplicate keys are an error (the default silently keeps the last one), `1e-4`
reads as a float (YAML 1.1 wants a dot: `1.0e-4`), and documents that are huge,
nest too deep, hold integers too long to convert, or expand through aliases into
too many elements (the "billion laughs" bomb, also when built by nesting lists of
aliases) are refused. Every such input ends in a ConfigError: one line naming
the file and the fix, never a traceback and never a hang.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError, Problem

MAX_BYTES = 1_000_000  # a config is a few KiB; anything near this is not a config
MAX_ALIASES = 100  # legitimate configs use a handful of anchors at most
# Elements (scalars, lists, mappings) once every alias is expanded: a config has a few
# hundred. Counting the expansion, not the aliases, catches a bomb built by nesting
# (9 levels of 9 aliases = 81 aliases, 9^9 elements) before anything walks it.
MAX_NODES = 20_000
MAX_DEPTH = 64  # nesting levels; the composer and the validators recurse per level
MAX_INT_DIGITS = 100  # int() refuses > 4300 digits with a ValueError; no knob needs 100

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
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {MAX_ALIASES} aliases (alias bomb?)", mark
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits (more than {MAX_INT_DIGITS})",
                node.start_mark)
        return super().construct_yaml_int(node)

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


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def expanded_size(node: yaml.Node) -> int:
    """Elements `node` stands for once every alias is expanded, counting a shared node
    once per use (memoised: linear in the composed graph, never in the expansion; capped
    just above MAX_NODES). ValueError for a node that contains itself."""
    done: dict[int, int] = {}
    in_progress: set[int] = set()
    # Iterative post-order walk: a deep document must not hit Python's recursion limit.
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        if children_done:
            in_progress.discard(key)
            total = 1 + sum(done[id(c)] for c in _children(current))
            done[key] = min(total, MAX_NODES + 1)
        elif key in in_progress:
            raise ValueError("an alias refers to a node that contains it")
        elif key not in done:
            in_progress.add(key)
            stack.append((current, True))
            stack.extend((c, False) for c in _children(current))
    return done[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


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
    loader = None
    try:
        loader = StrictLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = expanded_size(node)
        except ValueError as e:
            raise ConfigError([Problem(source, "", f"invalid YAML: {e}",
                                       "remove the recursive alias")]) from None
        if size > MAX_NODES:
            raise ConfigError([Problem(
                source, "", f"the document expands to more than {MAX_NODES} elements "
                "through its aliases (a YAML bomb?)",
                "write the values out, or use fewer anchors and aliases")])
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = " ".join(" ".join(str(p).split()) for p in (e.context, e.problem) if p)
        fix = ("nest the document less deeply" if "nested more than" in what else
               f"write numbers with at most {MAX_INT_DIGITS} digits" if "digits" in what else
               "fix the YAML syntax at that position")
        raise ConfigError([Problem(where, "", f"invalid YAML: {clip(what, 200)}",
                                   fix)]) from None
    except yaml.YAMLError as e:
        what = clip(" ".join(str(e).split()), 200)  # one line: the reader's text has two
        problem = Problem(source, "", f"invalid YAML: {what}", "fix the YAML syntax")
        raise ConfigError([problem]) from None
    except RecursionError:  # a guard above was missed: still one line, never a traceback
        raise ConfigError([Problem(source, "", "invalid YAML: nested too deep",
                                   f"nest at most {MAX_DEPTH} levels")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text_file(path: str | Path, what: str = "a config") -> str:
    """The UTF-8 text of a small file the user points at; any reason it is not that
    (missing, a directory, unreadable, binary, another encoding, too big) is a ConfigError
    naming the file and the fix."""
    p = Path(path)
    src = str(p)
    try:
        if p.is_dir():
            raise ConfigError([Problem(src, "", "is a directory, not a file",
                                       f"give the path of {what} file")])
        if not p.is_file():
            raise ConfigError([Problem(src, "", "file not found", "check the path")])
        if p.stat().st_size > MAX_BYTES:
            raise ConfigError([Problem(src, "", f"file is larger than {MAX_BYTES} bytes",
                                       f"{what} is a few KiB; check the path")])
        data = p.read_bytes()[: MAX_BYTES + 1]
    except OSError as e:
        raise ConfigError([Problem(src, "", f"cannot be read: {e.strerror or e}",
                                   "check the path and its permissions")]) from None
    if len(data) > MAX_BYTES:  # grew since stat, or a device file
        raise ConfigError([Problem(src, "", f"file is larger than {MAX_BYTES} bytes",
                                   f"{what} is a few KiB; check the path")])
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError([Problem(src, "", "is UTF-16 text",
                                   "save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")])
    if b"\0" in data:
        raise ConfigError([Problem(src, "", f"contains a NUL byte at offset {data.index(0)} "
                                   "(a binary file?)", f"give the path of {what} (UTF-8 text)")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(src, "", f"is not UTF-8 text (byte {e.start})",
                                   "save it as UTF-8, or check the path")]) from None


def load_yaml_file(path: str | Path) -> Any:
    """Read and strictly parse a YAML file; a missing file is a ConfigError."""
    return parse_yaml(read_text_file(path), str(path))


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters (with "..."): bounded message parts."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def preview(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, built without formatting the whole
    value: error messages about a huge (e.g. alias-expanded) value stay short and fast."""
    return _Preview(limit).repr(value)


class _Preview(reprlib.Repr):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 6, 6
        self.maxstring = self.maxother = self.maxlong = limit
        self.limit = limit

    def repr(self, x: Any) -> str:
        text = super().repr(x)
        return text if len(text) <= self.limit else text[: self.limit - 3] + "..."

    def repr_int(self, x: int, level: int) -> str:
        # str() of an int over 4300 digits raises ValueError; say how long it is instead
        if x.bit_length() > 300:
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)


def parse_scalar(text: str) -> Any:
    """Parse a `--set key=value` value with the same rules as a YAML file."""
    return parse_yaml(text, "--set") if text.strip() else ""


def dump_yaml(data: Any) -> str:
    """Dump plain data as YAML that StrictLoader reads back to the same values."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
