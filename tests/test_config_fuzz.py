"""Property-based fuzzing of the two config loaders: ConfigError or a valid object, nothing else.

Start from the shipped, valid YAML files (trainer: configs/phase2.yaml, configs/reference.yaml;
search: configs/search.yaml, configs/smoke.yaml), mutate them at random -- on the parsed data
(delete a key, rename it to a near-typo, replace a value with a scalar of another type, insert
an unknown key) or on the text (truncate, duplicate a line, insert random unicode) -- and load
the result with `trainer.config.load_config` / `config_from_data` / `tuning.search_config.
load_search`. Every load must either return a valid object or raise `ConfigError`, whose every
line starts with the file it blames; never another exception type. `load_search` must not start
Ray.

Loader bugs this fuzzing found (each raised something other than ConfigError) are pinned
one by one in `test_known_bug` with their minimal input, as regression tests.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import TrainConfig, config_from_data, load_config
from trainer.errors import ConfigError
from trainer.yaml_io import dump_yaml, parse_yaml
from tuning.search_config import Loaded, load_search

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BASE_CONFIG = CONFIGS / "phase2.yaml"
TRAIN_FILES = ("phase2.yaml", "reference.yaml")
SEARCH_FILES = ("search.yaml", "smoke.yaml")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no example database shared between runs or parallel test workers
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)


def _search_text(name: str) -> str:
    """A shipped search config whose base.config no longer depends on the working directory."""
    text = (CONFIGS / name).read_text(encoding="utf-8")
    return text.replace("config: phase2.yaml", f"config: {json.dumps(str(BASE_CONFIG))}")


TRAIN_TEXT = {name: (CONFIGS / name).read_text(encoding="utf-8") for name in TRAIN_FILES}
SEARCH_TEXT = {name: _search_text(name) for name in SEARCH_FILES}

# ------------------------------------------------------------------ known bugs (see test_known_bug)

def check_load(load: Callable[[], Any], sources: tuple[str, ...]) -> Any:
    """Run a loader: its result (or None after a ConfigError that names one of `sources`)."""
    try:
        return load()
    except ConfigError as err:
        assert err.problems, "a ConfigError without problems"
        for line in err.lines():
            assert line.startswith(sources), f"error line names no source file: {line!r}"
        return None


def assert_valid_train(cfg: Any) -> None:
    assert isinstance(cfg, TrainConfig)
    assert cfg.output.root.is_absolute()
    # What a run writes to config.resolved.yaml must load back to the same config.
    again = config_from_data(parse_yaml(dump_yaml(cfg.to_plain())), "roundtrip")
    assert again.to_plain() == cfg.to_plain() or _has_nan(cfg.to_plain())


def load_search_used(path: Path) -> Loaded:
    """load_search, then what the sweep reads first (the sweep directory)."""
    loaded = load_search(path)
    assert loaded.sweep_dir.is_absolute()
    return loaded


def assert_valid_search(loaded: Any) -> None:
    assert isinstance(loaded, Loaded)
    assert isinstance(loaded.base, TrainConfig)
    assert loaded.cfg.space, "an empty space must be refused"


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nan(v) for v in value)
    return False


# ------------------------------------------------------------------ strategies

_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
_SCALARS = st.one_of(
    _TEXT,
    st.integers(),
    st.floats(max_value=-1e-300),  # negative floats, -inf included
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.lists(st.one_of(st.integers(), _TEXT, st.none()), max_size=3),
    st.dictionaries(_TEXT, st.one_of(st.integers(), _TEXT, st.none()), max_size=3),
    st.sampled_from([
        10**30, -(10**30), 2**63, 2**64 + 1, 10**400, 1e308, -1e308, 5e-324,
        math.nan, math.inf, -math.inf, 0, -1, 0.0, -0.0, "", " ", "null", "~", "1e-4", "0x1F",
        ".nan", "yes", "\u202e", "日本語", "../..", "/", ".", [], {}, [[]], {"": None},
    ]),
)
_UNICODE = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list(":{}[],&*!|>'\"%@`#-?\t\n \\")),
    ),
    min_size=1,
    max_size=6,
)


def _typos(key: str) -> list[str]:
    """Near-misses of a key: a letter dropped, doubled, swapped, cased, '_' <-> '-', '.' added."""
    out = {key.upper(), key.capitalize(), key + "s", key + ".", "_" + key, key.replace("_", "-"),
           key.replace("_", ""), key.replace(".", "_"), key + " "}
    for i in range(len(key)):
        out.add(key[:i] + key[i + 1:])
        out.add(key[:i] + key[i] + key[i:])
        if i + 1 < len(key):
            out.add(key[:i] + key[i + 1] + key[i] + key[i + 2:])
    out.discard(key)
    out.discard("")
    return sorted(out)


def _mappings(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every mapping in the tree (the root included)."""
    found = []
    if isinstance(node, dict):
        found.append(path)
        for key, value in node.items():
            found += _mappings(value, (*path, key))
    return found


def _at(root: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        root = root[part]
    return root


def _scalar(draw: st.DrawFn) -> Any:
    # A copy: _SCALARS samples shared objects ({}, [[]]) that a later mutation of the same
    # example would otherwise change for every example after it (hypothesis then reports
    # its data generation as flaky).
    return copy.deepcopy(draw(_SCALARS))


@st.composite
def mutated_data(draw: st.DrawFn, original: dict[str, Any]) -> dict[str, Any]:
    """1-3 structural mutations of parsed config data."""
    data = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(data, dict):
            break
        node = _at(data, draw(st.sampled_from(_mappings(data))))
        keys = list(node)
        op = draw(st.sampled_from(["delete", "rename", "replace", "insert", "insert_typo"]))
        if op == "insert" or not keys:
            node[draw(st.one_of(_TEXT, st.integers(), st.none(), st.booleans()))] = _scalar(draw)
            continue
        key = draw(st.sampled_from(keys))
        if op == "delete":
            del node[key]
        elif op == "rename":
            new = draw(st.sampled_from(_typos(str(key)) or ["x"]))
            node[new] = node.pop(key)
        elif op == "replace":
            node[key] = _scalar(draw)
        else:  # a typo of an existing key next to the original
            node[draw(st.sampled_from(_typos(str(key)) or ["x"]))] = copy.deepcopy(node[key])
    return data


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> str:
    """1-3 textual mutations: truncate, duplicate/delete/indent a line, insert unicode."""
    for _ in range(draw(st.integers(1, 3))):
        lines = text.splitlines(keepends=True) or [""]
        op = draw(st.sampled_from(["truncate", "duplicate", "delete", "indent", "insert"]))
        if op == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        elif op in ("duplicate", "delete", "indent"):
            i = draw(st.integers(0, len(lines) - 1))
            if op == "duplicate":
                lines.insert(draw(st.integers(0, len(lines))), lines[i])
            elif op == "delete":
                del lines[i]
            else:
                lines[i] = draw(st.sampled_from([" ", "  ", "\t"])) + lines[i]
            text = "".join(lines)
        else:
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(_UNICODE) + text[at:]
    return text


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ trainer config

def test_shipped_files_are_valid_starting_points(fuzz_dir: Path) -> None:
    import ray

    ray_before = ray.is_initialized()  # another test module may hold a Ray of its own
    for name, text in TRAIN_TEXT.items():
        assert_valid_train(load_config(_write(fuzz_dir / name, text)))
    for name, text in SEARCH_TEXT.items():
        assert_valid_search(load_search_used(_write(fuzz_dir / name, text)))
    assert ray.is_initialized() == ray_before, "loading a config started Ray"


@FUZZ
@given(data=st.data(), name=st.sampled_from(TRAIN_FILES))
def test_train_config_data_mutations(fuzz_dir: Path, data: st.DataObject, name: str) -> None:
    raw = data.draw(mutated_data(parse_yaml(TRAIN_TEXT[name])), label="config")
    source = f"fuzz/{name}"
    cfg = check_load(lambda: config_from_data(copy.deepcopy(raw), source), (source,))
    if cfg is not None:
        assert_valid_train(cfg)
    # The same data through a file: YAML dump + strict reload + validation.
    path = _write(fuzz_dir / f"data-{name}", dump_yaml(raw))
    cfg = check_load(lambda: load_config(path), (str(path),))
    if cfg is not None:
        assert_valid_train(cfg)


@FUZZ
@given(data=st.data(), name=st.sampled_from(TRAIN_FILES))
def test_train_config_text_mutations(fuzz_dir: Path, data: st.DataObject, name: str) -> None:
    text = data.draw(mutated_text(TRAIN_TEXT[name]), label="text")
    path = _write(fuzz_dir / f"text-{name}", text)
    cfg = check_load(lambda: load_config(path), (str(path),))
    if cfg is not None:
        assert_valid_train(cfg)


@FUZZ
@given(
    name=st.sampled_from(TRAIN_FILES),
    key=st.one_of(st.sampled_from(["phase2.learning_rate", "phase2.epochs", "model.lora.r",
                                   "output.root", "phase2", "demo.llm", "phase2.epochs.x",
                                   "phase2..x", ".", ""]), _TEXT),
    value=st.one_of(_TEXT, st.sampled_from(["null", "[1, 2]", "{a: 1}", ".inf", "-1", "1e999",
                                            "'", ": :", "&a [*a]"])),
    sep=st.sampled_from(["=", "", "=="]),
)
def test_train_config_overrides(fuzz_dir: Path, name: str, key: str, value: str,
                                sep: str) -> None:
    path = _write(fuzz_dir / f"set-{name}", TRAIN_TEXT[name])
    cfg = check_load(lambda: load_config(path, [f"{key}{sep}{value}"]), (str(path), "--set"))
    if cfg is not None:
        assert_valid_train(cfg)


# ------------------------------------------------------------------ search config

def _load_search_checked(path: Path, extra_sources: tuple[str, ...] = ()) -> None:
    # Errors of the base config (or of base.overrides applied to it) name the base file.
    sources = (str(path), str(BASE_CONFIG), *extra_sources)
    ray_before = _ray_up()
    loaded = check_load(lambda: load_search_used(path), sources)
    assert _ray_up() == ray_before, "load_search started Ray"
    if loaded is not None:
        assert_valid_search(loaded)


@FUZZ
@given(data=st.data(), name=st.sampled_from(SEARCH_FILES))
def test_search_config_data_mutations(fuzz_dir: Path, data: st.DataObject, name: str) -> None:
    raw = data.draw(mutated_data(parse_yaml(SEARCH_TEXT[name])), label="search")
    path = _write(fuzz_dir / f"data-{name}", dump_yaml(raw))
    _load_search_checked(path)


@FUZZ
@given(data=st.data(), name=st.sampled_from(SEARCH_FILES))
def test_search_config_text_mutations(fuzz_dir: Path, data: st.DataObject, name: str) -> None:
    text = data.draw(mutated_text(SEARCH_TEXT[name]), label="search")
    _load_search_checked(_write(fuzz_dir / f"text-{name}", text))


@FUZZ
@given(data=st.data(), text_mode=st.booleans())
def test_search_config_with_mutated_base(fuzz_dir: Path, data: st.DataObject,
                                         text_mode: bool) -> None:
    """search.yaml (with base.overrides) over a mutated copy of configs/phase2.yaml."""
    if text_mode:
        base_text = data.draw(mutated_text(TRAIN_TEXT["phase2.yaml"]), label="base")
    else:
        base_text = dump_yaml(data.draw(mutated_data(parse_yaml(TRAIN_TEXT["phase2.yaml"])),
                                        label="base"))
    base = _write(fuzz_dir / "base-phase2.yaml", base_text)
    search = SEARCH_TEXT["search.yaml"].replace(json.dumps(str(BASE_CONFIG)),
                                                json.dumps(str(base)))
    _load_search_checked(_write(fuzz_dir / "search-over-base.yaml", search), (str(base),))


# ------------------------------------------------------------------ known bugs, minimal inputs

SPACE = "space:\n  learning_rate: 0.001\n"
KNOWN_BUG_CASES = {
    # StrictLoader.construct_mapping does `key in seen` before PyYAML's own hashability check.
    "yaml-unhashable-key": ("train", "? [a]\n: 1\n"),
    # _absolutize calls Path.resolve(), which raises ValueError on a NUL byte.
    "nul-byte-in-path": ("train", 'output:\n  root: "\\0"\n'),
    # storage_path is validated as a Path, then Loaded.sweep_dir's resolve() raises ValueError.
    "nul-byte-in-storage-path": ("search", 'sweep:\n  storage_path: "\\0"\n' + SPACE),
    # search_config._set walks into an existing scalar (phase2.epochs: 3 in the base file).
    "search-set-through-scalar": (
        "search", "base:\n  config: @BASE@\n  overrides:\n    phase2.epochs.x: 1\n" + SPACE),
    # domain_problems formats sorted(spec): int and str keys do not compare.
    "search-domain-mixed-keys": ("search", "space:\n  learning_rate: {1: 2, a: 3}\n"),
    # A base config whose top level is a list/string, with overrides: _set on a non-dict.
    "search-base-not-a-mapping": (
        "search", "base:\n  config: @BASE_LIST@\n  overrides:\n    phase2.epochs: 1\n" + SPACE),
}


@pytest.mark.parametrize("bug", list(KNOWN_BUG_CASES))
def test_known_bug(tmp_path: Path, bug: str) -> None:
    kind, text = KNOWN_BUG_CASES[bug]
    base_list = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    text = text.replace("@BASE@", json.dumps(str(BASE_CONFIG)))
    text = text.replace("@BASE_LIST@", json.dumps(str(base_list)))
    path = _write(tmp_path / "case.yaml", text)
    with pytest.raises(ConfigError) as err:  # what it should raise
        load_config(path) if kind == "train" else load_search_used(path)
    sources = (str(path), str(BASE_CONFIG), str(base_list))
    assert all(line.startswith(sources) for line in err.value.lines())


# ------------------------------------------------------------------ hostile input (issue 25)
# Inputs an attacker or an unlucky user gives: YAML bombs built by nesting (sizes around the
# expansion limit), random bytes, other encodings, deep nesting; in files for both loaders,
# through --set, and through both CLIs. Each must end in one bounded line per problem.

MAX_LINE = 2000  # an error line is read by a person: a value in it is a bounded preview


def check_bounded(load: Callable[[], Any], sources: tuple[str, ...]) -> Any:
    result = check_load(load, sources)
    if result is None:
        with pytest.raises(ConfigError) as err:
            load()
        assert all(len(line) < MAX_LINE for line in err.value.lines()), err.value.lines()
    return result


def nesting_bomb(width: int, depth: int) -> str:
    """A flow list holding every level of a bomb: level i is `width` aliases to level i-1,
    so the last level alone expands to width**depth elements (9, 9: 387M)."""
    levels = ["&l0 x"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]"
                          for i in range(1, depth + 1)]
    return "[" + ", ".join(levels) + "]"


def expanded(width: int, depth: int) -> int:
    return sum(sum(width ** k for k in range(i + 1)) for i in range(depth + 1)) + 1


# Keys the issue found hanging with a bomb as their value, and their file kind.
BOMB_KEYS = {
    "train": ["phase2.learning_rate", "model.lora.target_modules", "phase2", "output.root"],
    "search": ["num_samples", "space.learning_rate.grid", "space.learning_rate.choice",
               "base.overrides.phase2\\.epochs", "sweep.name", "stability"],
}


def _nest_under(dotted: str, value: str) -> str:
    """YAML text holding `value` (flow YAML) at a dotted key ('\\.' keeps a dot in a key)."""
    parts = [p.replace("\0", ".") for p in dotted.replace("\\.", "\0").split(".")]
    text = value
    for part in reversed(parts):
        text = f"{{{json.dumps(part)}: {text}}}"
    return text


@FUZZ
@given(width=st.integers(2, 12), depth=st.integers(1, 10), kind=st.sampled_from(["train",
                                                                                  "search"]),
       data=st.data())
def test_nesting_bombs_around_the_limit(fuzz_dir: Path, width: int, depth: int, kind: str,
                                        data: st.DataObject) -> None:
    from trainer.yaml_io import MAX_NODES

    key = data.draw(st.sampled_from(BOMB_KEYS[kind]), label="key")
    text = _nest_under(key, nesting_bomb(width, depth))
    if kind == "search" and not key.startswith("space"):
        text = text[:-1] + ", space: {learning_rate: 0.001}}"
    path = _write(fuzz_dir / f"bomb-{kind}.yaml", text)
    load = (lambda: load_config(path)) if kind == "train" else (lambda: load_search_used(path))
    result = check_bounded(load, (str(path), str(BASE_CONFIG)))
    if expanded(width, depth) > MAX_NODES * 1.1:
        assert result is None, "a bomb above the limit was expanded"


@FUZZ
@given(width=st.integers(2, 12), depth=st.integers(1, 10),
       key=st.sampled_from(["phase2.learning_rate", "model.lora.target_modules", "phase2"]))
def test_nesting_bombs_through_set(fuzz_dir: Path, width: int, depth: int, key: str) -> None:
    path = _write(fuzz_dir / "set-bomb.yaml", TRAIN_TEXT["phase2.yaml"])
    check_bounded(lambda: load_config(path, [f"{key}={nesting_bomb(width, depth)}"]),
                  (str(path), "--set"))


DEEP_OPENERS = {"list": ("[", "]"), "map": ("{b: ", "}"), "block": None}


def deep(kind: str, levels: int) -> str:
    if kind == "block":
        return "".join("  " * i + "b:\n" for i in range(levels)) + "  " * levels + "x: 1\n"
    opener, closer = DEEP_OPENERS[kind]
    return opener * levels + "1" + closer * levels


@FUZZ
@given(kind=st.sampled_from(list(DEEP_OPENERS)),
       levels=st.one_of(st.integers(50, 80), st.sampled_from([1000, 10_000])),
       closed=st.booleans(), via_set=st.booleans())
def test_deep_nesting_is_one_line(fuzz_dir: Path, kind: str, levels: int, closed: bool,
                                  via_set: bool) -> None:
    text = deep(kind, levels)
    if not closed and kind != "block":
        text = text[: len(text) // 2]
    if via_set and kind != "block":
        path = _write(fuzz_dir / "deep-base.yaml", TRAIN_TEXT["phase2.yaml"])
        check_bounded(lambda: load_config(path, [f"phase2.epochs={text}"]), (str(path), "--set"))
    else:
        path = _write(fuzz_dir / "deep.yaml", text)
        check_bounded(lambda: load_config(path), (str(path),))
        check_bounded(lambda: load_search_used(path), (str(path),))


@FUZZ
@given(blob=st.binary(min_size=1, max_size=400), prefix=st.sampled_from([b"", b"phase2:\n  "]))
def test_random_bytes_are_one_line(fuzz_dir: Path, blob: bytes, prefix: bytes) -> None:
    path = fuzz_dir / "bytes.yaml"
    path.write_bytes(prefix + blob)
    check_bounded(lambda: load_config(path), (str(path),))
    check_bounded(lambda: load_search_used(path), (str(path),))


@FUZZ
@given(name=st.sampled_from(TRAIN_FILES),
       encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1",
                                 "cp1252", "shift_jis"]),
       extra=st.text(alphabet="éßü日本€", min_size=1, max_size=5))
def test_other_encodings_are_one_line(fuzz_dir: Path, name: str, encoding: str,
                                      extra: str) -> None:
    path = fuzz_dir / f"enc-{name}"
    text = TRAIN_TEXT[name] + f"# {extra}\n"
    path.write_bytes(text.encode(encoding, errors="replace"))
    cfg = check_bounded(lambda: load_config(path), (str(path),))
    if cfg is not None:  # only an encoding that left the file valid UTF-8 may load
        text.encode(encoding, errors="replace").decode("utf-8")


HOSTILE_FILES = {
    "empty": b"",
    "comments-only": b"# nothing here\n",
    "nul": b"phase2:\n  epochs: 1\0\n",
    "utf16": "phase2:\n  epochs: 1\n".encode("utf-16"),
    "random": bytes(range(256)),
    "long-int": b"phase2:\n  epochs: " + b"7" * 5000 + b"\n",
    "deep-list": b"[" * 10_000,
    "deep-map": b"{b: " * 10_000,
    "bomb-9x9": nesting_bomb(9, 9).encode(),
    "recursive-alias": b"&a [*a]",
}


@pytest.mark.parametrize("case", [*HOSTILE_FILES, "directory"])
@pytest.mark.parametrize("cli", ["trainer", "sweep"])
def test_hostile_files_through_both_clis(tmp_path: Path, capsys, cli: str, case: str) -> None:
    from trainer.__main__ import main as train_main
    from tuning.sweep import main as sweep_main

    path = tmp_path / "dir" if case == "directory" else tmp_path / f"{case}.yaml"
    if case == "directory":
        path.mkdir()
    else:
        path.write_bytes(HOSTILE_FILES[case])
    if cli == "trainer":
        rc = train_main([str(path), "--print-config"])
    else:
        rc = sweep_main([str(path), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and all(line.startswith(f"error: {path}") and len(line) < MAX_LINE
                       for line in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written


@pytest.mark.parametrize("value", ["[" * 10_000, "{b: " * 10_000, "9" * 5000,
                                   nesting_bomb(9, 9), nesting_bomb(9, 4)])
@pytest.mark.parametrize("cli", ["trainer", "sweep"])
def test_hostile_set_values_through_both_clis(tmp_path: Path, capsys, cli: str,
                                              value: str) -> None:
    from trainer.__main__ import main as train_main
    from tuning.sweep import main as sweep_main

    if cli == "trainer":
        path = _write(tmp_path / "phase2.yaml", TRAIN_TEXT["phase2.yaml"])
        rc = train_main([str(path), "--set", f"phase2.learning_rate={value}", "--print-config"])
    else:
        path = _write(tmp_path / "search.yaml", SEARCH_TEXT["smoke.yaml"])
        rc = sweep_main([str(path), "--set", f"num_samples={value}", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    assert all(line.startswith(("error: --set", f"error: {path}")) and len(line) < MAX_LINE
               for line in err), err
