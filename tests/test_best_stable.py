"""best_stable.yaml reproduces the winning trial: `python -m trainer best_stable.yaml` trains
the same LLM, Phase 1 bundle, manifest and knobs as the trial did.

The two "trials" are trainer runs written where a sweep writes them (<sweep>/trials/<id>),
then the report is rebuilt from disk (tuning.analysis.report.build_report): no Ray needed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, tiny_data
from test_llm_families import save_tiny_llm

from trainer.config import config_from_data
from trainer.loop import train
from trainer.yaml_io import load_yaml_file
from tuning.analysis.report import build_report


def test_best_stable_yaml_trains_the_winning_trials_model_and_knobs(tmp_path, assets_dir):
    llm = save_tiny_llm("gpt2", tmp_path / "gpt2")  # not the demo LLM: the model must carry
    sweep = tmp_path / "sweeps" / "s"
    for trial, lr in (("t_lo", 3e-3), ("t_hi", 5e-3)):
        data = tiny_data(sweep / "trials", assets_dir, learning_rate=lr, total_training_steps=8,
                         warmup_steps=1, lora_lr_mult=0.25)
        data["model"] = {"llm_path": str(llm), "lora": {"target_modules": ["c_attn"], "r": 4}}
        data["output"]["run_name"] = trial
        train(config_from_data(data, f"{trial}.yaml"), console=False, log=lambda *_: None)

    report = build_report(sweep)
    best = report.files["best_stable"]
    trial_dir = sweep / "trials" / report.best_trial
    text = best.read_text()
    assert text.index("phase2:") < text.index("model:")  # the seed's block first
    assert f"# the whole config the trial ran: {trial_dir / 'config.resolved.yaml'}" in text

    res = subprocess.run(
        [sys.executable, "-m", "trainer", str(best), "--set", "output.run_name=again"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    again = best.parent / "runs" / "again"  # relative to the yaml, written absolute
    assert f"run directory: {again}" in res.stdout

    ran = load_yaml_file(trial_dir / "config.resolved.yaml")
    redo = load_yaml_file(again / "config.resolved.yaml")
    assert redo["model"]["llm_path"] == str(llm)
    assert redo["model"]["lora"]["target_modules"] == ["c_attn"]
    assert redo["phase2"]["lora_lr_mult"] == 0.25
    for section in ran:
        if section != "output":  # only where the run goes differs
            assert redo[section] == ran[section], section
    assert {k: v for k, v in redo["output"].items() if k not in ("root", "run_name")} == \
        {k: v for k, v in ran["output"].items() if k not in ("root", "run_name")}
    # the retrained model's losses are the trial's, step for step (same everything)
    assert (again / "metrics.jsonl").read_text().count("\n") == 8
    losses = [line.split('"loss": ')[1].split(",")[0]
              for p in (trial_dir, again) for line in (p / "metrics.jsonl").read_text()
              .splitlines()]
    assert losses[:8] == losses[8:]
