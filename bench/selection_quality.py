"""Does the sweep pick a truly stable, near-best setting, and at what compute?

    python bench/selection_quality.py [--steps 60] [--seeds 3] [--repeats 5] [--samples 24]

1. Ground truth: every configuration of a grid over the seed's knobs (base learning_rate
   across the demo's cliff x gradient_clip_val none/0.5/1.0 x projector_lr_mult x
   warmup_steps) is trained to completion with --seeds seeds each, through the trainer's
   public API in this one process (`trainer.train`, shared inputs built once).  A
   configuration is truly stable when every seed's run is stable (tuning.analysis.stability's
   verdict); its true quality is the mean final eval loss over the seeds.
2. The product: `python -m tuning.sweep` on a search.yaml that is configs/search.yaml with the
   same base run and the grid as `choice` spaces: its default search (random) and ASHA
   (grace_period 30, reduction_factor 3), --samples trials, repeated --repeats times with
   search seeds 0, 1, ...  The pick is the trial in its report's best_stable.yaml.
3. Per repeat and in total: is the pick truly stable; regret = true loss of the pick / best
   truly-stable true loss - 1; compute = optimizer steps summed over the sweep's trials as a
   fraction of the ground truth's.  Targets: truly stable every repeat, mean regret <= 2%,
   compute <= 25%.

Results: <out>/selection.json and <out>/selection.md (default bench/results/<date>-selection).
Also: how often a "plateaued" verdict (stable, learned < half of the best) fell on a truly
unstable configuration, the evidence for keeping plateaued trials in the stable set or not.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import config_from_data  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.yaml_io import dump_yaml, load_yaml_file  # noqa: E402
from tuning.analysis.leaderboard import best_stable_row, build_leaderboard  # noqa: E402
from tuning.analysis.report import collect_records  # noqa: E402
from tuning.analysis.stability import StabilityRules, verdict, verdicts_for  # noqa: E402
from tuning.analysis.trial_record import TrialRecord  # noqa: E402

# The seed's knobs. On the CPU demo (fp32, tiny LLM) the base LR is good around 1e-2, stalls
# above 0.1 and diverges (loss ends above its start, pre-clip grad norm >> 100) around 10;
# a true NaN needs ~1e3, so the cliff here is divergence.
GRID: dict[str, list[Any]] = {
    "learning_rate": [0.001, 0.01, 0.1, 1.0, 10.0],
    "gradient_clip_val": [None, 0.5, 1.0],
    "projector_lr_mult": [5.0, 10.0],
    "warmup_steps": [5, 20],
}
KNOBS = tuple(GRID)
TARGET_REGRET = 0.02
TARGET_COMPUTE = 0.25


def base_data(work: Path, steps: int) -> dict[str, Any]:
    """configs/phase2.yaml (the demo) cut to ``steps`` optimizer steps, evaluated at the end."""
    data = load_yaml_file(ROOT / "configs" / "phase2.yaml")
    data["phase2"].update(total_training_steps=steps, nan_policy="stop")
    data["output"].update(root=str(work / "runs"), assets_dir=str(work / "assets"),
                          log_every=10**6, eval_every=10**6, checkpoint_every=10**6)
    return data


def grid_configs(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(KNOBS, values, strict=True)) for values in itertools.product(*grid.values())]


GRID_LIST = grid_configs(GRID)


def key_of(params: dict[str, Any]) -> tuple[Any, ...]:
    """A configuration's identity: its grid knobs, floats rounded past YAML noise."""
    return tuple(round(float(params[k]), 9) if params.get(k) is not None else None
                 for k in KNOBS)


def ground_truth(work: Path, steps: int, seeds: list[int], rules: StabilityRules,
                 log=print) -> dict[str, Any]:
    data = base_data(work, steps)
    inputs = prepare_inputs(config_from_data(data), log=lambda *_: None)
    configs, runs = [], []
    for index, knobs in enumerate(GRID_LIST):
        per_seed = []
        for seed in seeds:
            trial = copy.deepcopy(data)
            trial["phase2"].update(knobs, seed=seed)
            trial["output"]["run_name"] = f"gt{index:03d}_s{seed}"
            summary = train(config_from_data(trial, "ground-truth"), inputs=inputs,
                            console=False, log=lambda *_: None)
            record = TrialRecord.from_run_dir(summary.run_dir)
            runs.append(record)
            v = verdict(record, rules)
            per_seed.append({"seed": seed, "kind": v.kind, "stable": v.stable,
                             "eval_loss": summary.eval_loss, "steps": record.steps_done,
                             "clip_fraction": v.clip_fraction, "reasons": v.reasons})
        stable = all(r["stable"] for r in per_seed)
        losses = [r["eval_loss"] for r in per_seed if r["eval_loss"] is not None]
        configs.append({**knobs, "truly_stable": stable, "seeds": per_seed,
                        "true_loss": statistics.fmean(losses) if losses else None})
        log(f"[gt] {index + 1}/{len(GRID_LIST)} {knobs} stable={stable} "
            f"loss={configs[-1]['true_loss']}")
    # The plateau rule needs the sweep context: one "sweep" per seed over every configuration.
    plateau = plateau_evidence(configs, runs, seeds, rules)
    steps_total = sum(r["steps"] for c in configs for r in c["seeds"])
    return {"configs": configs, "steps": steps_total, "plateau_evidence": plateau}


def plateau_evidence(configs: list[dict[str, Any]], runs: list[TrialRecord], seeds: list[int],
                     rules: StabilityRules) -> dict[str, Any]:
    """Per seed, verdicts over all configurations as one sweep: of the runs marked plateaued,
    how many belong to a truly unstable configuration."""
    plateaued, on_unstable, on_stable_loss_ratio = 0, 0, []
    best_true = min((c["true_loss"] for c in configs if c["truly_stable"] and c["true_loss"]),
                    default=None)
    for offset, _seed in enumerate(seeds):
        subset = runs[offset::len(seeds)]
        verdicts = verdicts_for(subset, rules)
        for config, record in zip(configs, subset, strict=True):
            if verdicts[record.trial_id].kind != "plateaued":
                continue
            plateaued += 1
            if not config["truly_stable"]:
                on_unstable += 1
            elif best_true and config["true_loss"]:
                on_stable_loss_ratio.append(config["true_loss"] / best_true)
    return {"plateaued_runs": plateaued, "on_truly_unstable_configs": on_unstable,
            "true_loss_over_best_when_truly_stable": sorted(on_stable_loss_ratio)}


def search_yaml(work: Path, steps: int, samples: int, seed: int, name: str) -> Path:
    """configs/search.yaml (the product's defaults) over this benchmark's base run and grid."""
    data = load_yaml_file(ROOT / "configs" / "search.yaml")
    data["sweep"].update(name=name, storage_path=str(work / "sweeps"))
    data["base"]["config"] = str(ROOT / "configs" / "phase2.yaml")
    data["base"]["overrides"] = {
        "phase2.total_training_steps": steps, "phase2.nan_policy": "stop",
        "output.root": str(work / "runs"), "output.assets_dir": str(work / "assets"),
        "output.eval_every": 10**6, "output.log_every": 10**6,
    }
    data["space"] = {key: {"choice": values} for key, values in GRID.items()}
    data["num_samples"] = samples
    data["search"]["seed"] = seed
    data["ray"]["num_cpus"] = 2
    path = work / f"{name}.yaml"
    path.write_text(dump_yaml(data))
    return path


def run_product(work: Path, steps: int, samples: int, seed: int,
                rules: StabilityRules) -> dict[str, Any]:
    name = f"select-{seed}"
    path = search_yaml(work, steps, samples, seed, name)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tuning.sweep", str(path), "--restart"],
                          cwd=work, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    sweep_dir = work / "sweeps" / name
    records = collect_records(sweep_dir)
    rows = build_leaderboard(records, rules)
    best = best_stable_row(rows)
    best_yaml = sweep_dir / "report" / "best_stable.yaml"
    picked = load_yaml_file(best_yaml)["phase2"] if best_yaml.is_file() else None
    return {"seed": seed, "wall_s": wall, "trials": len(records),
            "steps": sum(r.steps_done for r in records),
            "finished": sum(1 for r in records if r.steps_done >= steps),
            "pick": None if best is None else best.trial_id,
            "pick_config": None if picked is None else {k: picked.get(k) for k in KNOBS},
            "pick_rank_measure": None if best is None else best.rank_measure}


def score(gt: dict[str, Any], product: dict[str, Any]) -> dict[str, Any]:
    by_key = {key_of(c): c for c in gt["configs"]}
    best = min(c["true_loss"] for c in gt["configs"] if c["truly_stable"])
    pick = product["pick_config"]
    if pick is None:
        return {**product, "truly_stable": False, "regret": None,
                "compute": product["steps"] / gt["steps"]}
    truth = by_key[key_of(pick)]
    return {**product, "truly_stable": truth["truly_stable"],
            "true_loss": truth["true_loss"], "regret": truth["true_loss"] / best - 1,
            "compute": product["steps"] / gt["steps"]}


def markdown(result: dict[str, Any]) -> str:
    gt, reps = result["ground_truth"], result["repeats"]
    n_stable = sum(c["truly_stable"] for c in gt["configs"])
    lines = [
        f"# Selection quality, {result['date']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Ground truth: {len(gt['configs'])} configurations x {len(result['seeds'])} seeds x "
        f"{result['steps']} steps ({gt['steps']} optimizer steps, {gt['wall_s']:.0f} s); "
        f"{n_stable} truly stable; best truly-stable true loss {result['best_true_loss']:.4g} "
        f"({result['best_config']}).",
        f"Product: `python -m tuning.sweep`, random search + ASHA (grace 30, rf 3), "
        f"{result['samples']} samples per repeat.",
        "",
        "| repeat (search seed) | pick | pick truly stable | regret | compute | trials "
        "(finished) | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in reps:
        regret = "-" if r["regret"] is None else f"{r['regret']:.2%}"
        lines.append(f"| {r['seed']} | {r['pick_config']} | {r['truly_stable']} | {regret} | "
                     f"{r['compute']:.1%} | {r['trials']} ({r['finished']}) | "
                     f"{r['wall_s']:.0f} |")
    total = result["total"]
    lines += [
        "",
        f"**Total:** truly stable in {total['truly_stable']}/{len(reps)} repeats "
        f"(target: all); mean regret {total['mean_regret']:.2%} (target <= 2%); "
        f"mean compute {total['mean_compute']:.1%} of the ground truth (target <= 25%).",
        "",
        f"Plateau evidence: {gt['plateau_evidence']['plateaued_runs']} runs marked plateaued "
        f"(one sweep per seed over all configurations), "
        f"{gt['plateau_evidence']['on_truly_unstable_configs']} of them on a truly unstable "
        "configuration.",
    ]
    return "\n".join(lines) + "\n"


def summarize(args: argparse.Namespace, argv: list[str] | None, date: str, seeds: list[int],
              gt: dict[str, Any], best: dict[str, Any], repeats: list[dict[str, Any]],
              t0: float) -> dict[str, Any]:
    regrets = [r["regret"] for r in repeats if r["regret"] is not None]
    return {
        "date": date, "command": "python bench/selection_quality.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "steps": args.steps, "seeds": seeds, "samples": args.samples, "grid": GRID,
        "best_true_loss": best["true_loss"], "best_config": {k: best[k] for k in KNOBS},
        "ground_truth": gt, "repeats": repeats,
        "total": {"truly_stable": sum(r["truly_stable"] for r in repeats),
                  "mean_regret": statistics.fmean(regrets) if regrets else float("nan"),
                  "max_regret": max(regrets) if regrets else float("nan"),
                  "mean_compute": statistics.fmean(r["compute"] for r in repeats),
                  "wall_s": time.time() - t0},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per full run")
    ap.add_argument("--seeds", type=int, default=3, help="ground-truth seeds per config")
    ap.add_argument("--repeats", type=int, default=5, help="sweeps, search seeds 0..R-1")
    ap.add_argument("--samples", type=int, default=24, help="num_samples per sweep")
    ap.add_argument("--out", type=Path, default=None,
                    help="results dir (default bench/results/<date>-selection)")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--ground-truth", type=Path, default=None,
                    help="reuse the ground truth of an earlier selection.json (same grid)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"{date}-selection"
    work = args.work or Path(tempfile.mkdtemp(prefix="selection-"))
    rules = StabilityRules()
    seeds = list(range(1, args.seeds + 1))
    t0 = time.time()
    if args.ground_truth:
        earlier = json.loads(args.ground_truth.read_text())
        if earlier["grid"] != GRID or earlier["steps"] != args.steps or earlier["seeds"] != seeds:
            print(f"error: {args.ground_truth}: another grid, steps or seeds; rerun without "
                  "--ground-truth", file=sys.stderr)
            return 2
        gt = earlier["ground_truth"]
    else:
        gt = ground_truth(work, args.steps, seeds, rules)
        gt["wall_s"] = time.time() - t0
        (work / "ground_truth.json").write_text(json.dumps(
            {"grid": GRID, "steps": args.steps, "seeds": seeds, "ground_truth": gt},
            default=str))
    stable = [c for c in gt["configs"] if c["truly_stable"]]
    if not stable:
        print("error: no truly stable configuration in the ground truth", file=sys.stderr)
        return 1
    best = min(stable, key=lambda c: c["true_loss"])
    repeats: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for seed in range(args.repeats):
        rep = score(gt, run_product(work, args.steps, args.samples, seed, rules))
        repeats.append(rep)
        print(f"[sweep] seed {seed}: pick {rep['pick_config']} truly_stable="
              f"{rep['truly_stable']} regret={rep['regret']} compute={rep['compute']:.1%} "
              f"({rep['wall_s']:.0f} s)", flush=True)
        # Written after every repeat: a slow shared machine still leaves the repeats done.
        result = summarize(args, argv, date, seeds, gt, best, repeats, t0)
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / "selection.md").write_text(markdown(result))
    print(markdown(result))
    targets_met = (result["total"]["truly_stable"] == len(repeats)
                   and result["total"]["mean_regret"] <= TARGET_REGRET
                   and result["total"]["mean_compute"] <= TARGET_COMPUTE)
    print(f"targets {'met' if targets_met else 'NOT met'}; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
