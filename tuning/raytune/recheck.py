"""The re-check after a sweep, on Ray: the top-K stable configs again over seeds and at
scaled learning rates (the plan and the verdict are tuning.analysis.recheck's), in its own
Tuner under <sweep_dir>/recheck; the recommendation goes to the report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ray import tune
from ray.tune.schedulers import FIFOScheduler

from trainer.inputs import Inputs
from tuning.analysis.best_config import write_best_stable_yaml
from tuning.analysis.recheck import explain_plan, match_plan, recheck_plan, summarize
from tuning.analysis.recheck_report import format_recheck, write_recheck
from tuning.analysis.report import Report, collect_records
from tuning.raytune.driver import fit, with_resources
from tuning.raytune.progress import ProgressCallback
from tuning.raytune.trainable import TrialOptions, run_listed_trial
from tuning.search_config import Loaded
from tuning.tracking.callback import MlflowSweepCallback


def run_recheck(loaded: Loaded, sweep_dir: Path, report: Report, top_k: int, *,
                inputs: Inputs, opts: TrialOptions, resume: bool) -> None:
    """Re-run the top-K stable configs over seeds and at LR x0.67 / x1.5; recommend the one
    with the most margin among those within `recheck.loss_tolerance` of the best loss."""
    cfg, rc = loaded.cfg, loaded.cfg.recheck
    records = collect_records(sweep_dir)
    plan = recheck_plan(records, cfg.stability, top_k, rc.seeds, rc.lr_factors,
                        swept_keys=cfg.space)
    print("\n[recheck] " + explain_plan(plan, records, cfg.stability, top_k))
    if not plan:
        return
    stage = sweep_dir / "recheck"
    # FIFO: every re-check run goes to the end, so their final losses compare.
    uri = cfg.mlflow.tracking_uri or f"sqlite:///{sweep_dir / 'mlflow' / 'mlflow.db'}"
    fit(stage, with_resources(run_listed_trial, cfg, configs=[t.config for t in plan],
                              base=loaded.base_data, inputs=inputs,
                              opts=replace(opts, trials_dir=stage / "trials")),
        param_space={"i": tune.grid_search(list(range(len(plan))))},
        tune_config=tune.TuneConfig(metric=cfg.search.metric, mode="min", num_samples=1,
                                    max_concurrent_trials=cfg.max_concurrent_trials,
                                    scheduler=FIFOScheduler(), reuse_actors=True),
        callbacks=[MlflowSweepCallback(
            tracking_uri=uri, experiment_name=cfg.mlflow.experiment or cfg.sweep.name,
            state_dir=stage / "mlflow", sweep_name=f"{cfg.sweep.name}-recheck",
            timeout_s=cfg.mlflow.timeout_s), ProgressCallback(len(plan))],
        max_failures=cfg.trials.max_failures, keep=cfg.trials.keep_checkpoints,
        resume=resume)
    summary = summarize(match_plan(plan, collect_records(stage)), cfg.stability,
                        loss_tolerance=rc.loss_tolerance)
    out = sweep_dir / "report"
    md, csv = write_recheck(summary, out / "recheck.md", out / "recheck.csv")
    report.files.update(recheck_md=md, recheck_csv=csv)
    print(format_recheck(summary))
    if summary.recommended:
        best = next(r for r in records if r.trial_id == summary.recommended)
        path = write_best_stable_yaml(best, out / "best_stable.yaml", sweep_name=cfg.sweep.name,
                                      rules=cfg.stability)
        report.best_trial = summary.recommended
        if path:
            report.files["best_stable"] = path
