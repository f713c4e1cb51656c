"""The package seams hold: trainer/ and tuning/analysis/ import neither Ray nor MLflow (a
report rebuilds from a copied sweep dir, a trainer run needs neither), and no module takes a
private (underscore) name from another project module.

Both checked twice: statically over every import statement (including those inside
functions, which an import-time check would miss) and by importing every module in a fresh
interpreter and looking at sys.modules (which catches an indirect import through a
third module)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FORBIDDEN = ("ray", "mlflow")
PROJECT = ("trainer", "tuning", "bench")
NO_RAY_NO_MLFLOW = ("trainer", "tuning/analysis")


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def _run_python(code: str) -> str:
    """`code`'s stdout, run in a fresh interpreter from the project root (which must exit 0)."""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_trainer_and_analysis_import_neither_ray_nor_mlflow_statically() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for folder in NO_RAY_NO_MLFLOW for path in _modules(folder)
             for module, _, line in _imports(path)
             if module.split(".")[0] in FORBIDDEN]
    assert not found, found
    assert len(_modules("tuning/analysis")) >= 8  # the walk found the package


def test_importing_every_trainer_and_analysis_module_loads_neither_ray_nor_mlflow() -> None:
    names = [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for folder in NO_RAY_NO_MLFLOW for path in _modules(folder)
             if path.name != "__main__.py"]
    code = ("import importlib, sys\n"
            f"for name in {names!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = _run_python(code)
    assert out.strip() == "[]", out


def test_no_private_name_is_imported_across_project_modules() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: from {module} import {name}"
             for folder in PROJECT for path in _modules(folder)
             for module, names, line in _imports(path)
             if module.split(".")[0] in PROJECT
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert not found, found


def test_every_project_import_resolves_including_those_inside_functions() -> None:
    # An import inside a function fails only when that path runs; after a module moves,
    # this finds the stale ones at once.
    wanted = sorted({(module, name) for folder in (*PROJECT, "tests")
                     for path in _modules(folder)
                     for module, names, _ in _imports(path)
                     if module.split(".")[0] in ("trainer", "tuning")
                     for name in names or [""]})
    code = ("import importlib, sys\n"
            "bad = []\n"
            f"for module, name in {wanted!r}:\n"
            "    try:\n"
            "        mod = importlib.import_module(module)\n"
            "        if name and not hasattr(mod, name):\n"
            "            importlib.import_module(module + '.' + name)\n"
            "    except ImportError as e:\n"
            "        bad.append(f'{module} {name}: {e}')\n"
            "print(bad)")
    out = _run_python(code)
    assert out.strip().splitlines()[-1] == "[]", out[-2000:]
    assert len(wanted) > 100  # the walk found the imports


def test_a_shared_groups_trial_client_imports_no_torch() -> None:
    """A shared group's trial processes are thin clients (join, poll, report): the modules
    they run, and a trial's config built from plain data, load no torch (each of a sweep's
    first wave of trial processes would import it while the group actor imports the LLM's
    code, on the same cores). The trainer package's names still load on first use."""
    code = ("import sys\n"
            "import tuning.raytune.group_actor, tuning.raytune.trainable\n"
            "from trainer.config import TrainConfig, config_from_data\n"
            "config_from_data(TrainConfig().to_plain(), 'test')\n"
            "print('torch' in sys.modules)\n"
            "import trainer\n"
            "print(trainer.train.__module__, 'torch' in sys.modules)\n")
    out = _run_python(code)
    assert out.split() == ["False", "trainer.loop", "True"], out


def test_a_shared_groups_trial_starts_without_importing_torch(tmp_path) -> None:
    """The trial-side start every group member runs before it joins (`start_trial`: its
    config, the check for a run finished on disk, Ray's checkpoint, its run dir) loads no
    torch either, whether or not its run dir holds an earlier attempt."""
    earlier = tmp_path / "trials" / "t1"
    earlier.mkdir(parents=True)
    (earlier / "summary.json").write_text("{}")  # an attempt that did not finish
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from unittest import mock\n"
            "import ray\n"
            "from ray import tune\n"
            "from trainer.config import TrainConfig\n"
            "from tuning.raytune.trainable import TrialOptions, start_trial\n"
            f"opts = TrialOptions(trials_dir=Path({str(tmp_path / 'trials')!r}), "
            "report_every=10, checkpoint_every=50, keep_checkpoints=2, nan_policy='stop', "
            "divergence_factor=None, stall_timeout_s=600.0, worst_loss=1e4, "
            "cpus_per_trial=1.0)\n"
            "for trial in ('t0', 't1'):\n"
            "    context = mock.Mock(**{'get_trial_id.return_value': trial})\n"
            "    with mock.patch.object(tune, 'get_context', return_value=context), \\\n"
            "            mock.patch.object(tune, 'get_checkpoint', return_value=None), \\\n"
            "            mock.patch.object(ray, 'get_runtime_context', return_value=mock.Mock("
            "**{'get_node_id.return_value': 'node'})):\n"
            "        start = start_trial({'learning_rate': 1e-3}, TrainConfig().to_plain(), "
            "opts)\n"
            "    print(start.trial_id, start.run_dir.is_dir(), start.cfg.phase2.learning_rate)\n"
            "print('torch' in sys.modules)\n")
    out = _run_python(code).split()
    assert out == ["t0", "True", "0.001", "t1", "True", "0.001", "False"], out
