"""Every `python -m ...` command the README and docs/ show still runs.

Commands are taken from fenced code blocks and from inline code spans that start with
`python -m`. Each distinct module's `--help` runs once (it must exist and exit 0), every
`--flag` a command uses must be one its `--help` lists, and the demo sweep's `--dry-run`
runs once. Full runs are left to the tests of each module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
_INLINE = re.compile(r"`(python -m [^`]+)`")
_COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*\w)(.*)")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def doc_commands() -> list[tuple[str, str, str]]:
    """(file, module, argument text) of every `python -m` command shown in the docs."""
    found = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        lines = []
        for block in _FENCE.findall(text):
            lines += re.sub(r"\\\n\s*", " ", block).splitlines()
        lines += _INLINE.findall(text)
        for line in lines:
            for match in _COMMAND.finditer(line):
                args = match.group(2).split("#", 1)[0]
                found.append((path.relative_to(ROOT).as_posix(), match.group(1), args))
    return found


COMMANDS = doc_commands()
MODULES = sorted({module for _, module, _ in COMMANDS})


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_docs_show_the_main_commands() -> None:
    # Guards the extraction itself: a broken pattern would find nothing and pass the rest.
    assert {"trainer", "tuning.sweep", "tuning.report", "tuning.sync", "trainer.phase1"} <= set(
        MODULES), MODULES
    assert any(f == "README.md" and m == "tuning.sweep" and "configs/search.yaml" in a
               for f, m, a in COMMANDS)


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`python -m MODULE --help` once per module, run outside the repository."""
    cwd = tmp_path_factory.mktemp("help")
    texts = {}
    for module in MODULES:
        proc = _run(["-m", module, "--help"], cwd)
        assert proc.returncode == 0, f"python -m {module} --help: {proc.stderr[-2000:]}"
        assert "usage:" in proc.stdout, f"python -m {module} --help printed no usage"
        texts[module] = proc.stdout
    return texts


def test_every_documented_flag_is_in_its_modules_help(help_texts: dict[str, str]) -> None:
    unknown = defaultdict(set)
    for file, module, args in COMMANDS:
        for flag in _FLAG.findall(args):
            if flag not in help_texts[module]:
                unknown[f"{file}: python -m {module}"].add(flag)
    assert not unknown, dict(unknown)


def test_the_demo_sweep_dry_run_runs(tmp_path: Path) -> None:
    proc = _run(["-m", "tuning.sweep", str(ROOT / "configs" / "search.yaml"), "--dry-run"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trials: 8" in proc.stdout, proc.stdout
    assert not (tmp_path / "runs" / "sweeps").exists(), "--dry-run wrote a sweep directory"
