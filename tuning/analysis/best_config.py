"""The best stable trial as a ready-to-train config (``best_stable.yaml``).

The leaderboard (tuning.analysis.leaderboard) picks the trial; this module writes what it
ran -- its whole resolved config, the seed's ``phase2:`` block first with one commented
knob a line -- so ``python -m trainer best_stable.yaml`` trains the tuned model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from trainer.fsutil import atomic_write_text
from tuning.analysis.leaderboard import PHASE2_KNOBS, Row, best_stable_row
from tuning.analysis.stability import StabilityRules, Verdict, fmt_num, verdict
from tuning.analysis.trial_record import RESOLVED_CONFIG, TrialRecord, finite_or_none


def best_stable_config(rows: Sequence[Row]) -> dict[str, Any] | None:
    """The `phase2:` mapping of the best stable trial (None when no trial was stable)."""
    row = best_stable_row(rows)
    return phase2_config(row.params) if row is not None else None



def phase2_config(params: dict[str, Any]) -> dict[str, Any]:
    """Keep the knobs the trainer's phase2 section accepts, in the seed's order.

    gradient_clip_val is always present (None = no clipping) because whether a stable setting
    relied on clipping is the first thing a reader of the file needs to know.
    """
    config = {key: params[key] for key in PHASE2_KNOBS if key in params}
    config.setdefault("gradient_clip_val", None)
    return {key: config[key] for key in PHASE2_KNOBS if key in config}


BEST_RUNS_DIR = "runs"  # best_stable.yaml trains into <its own directory>/runs


def write_best_stable_yaml(
    record: TrialRecord | None,
    path: str | Path,
    *,
    sweep_name: str = "sweep",
    rules: StabilityRules | None = None,
) -> Path | None:
    """Write the config ``record``'s trial ran as a ready-to-use trainer config.

    The whole config comes from the trial's own ``config.resolved.yaml`` (every default
    explicit, every path absolute), so ``python -m trainer best_stable.yaml`` trains the
    same LLM, Phase 1, data and knobs; the seed's ``phase2:`` block comes first, one
    commented knob a line. Only ``output`` changes: runs go to ``<path's dir>/runs``
    (absolute) under a fresh timestamped name, never into the trial's own directory.
    A record without a run directory (built in memory) gives the ``phase2:`` block alone.

    Returns None and writes nothing when there is no stable trial (``record`` is None).
    Raises ValueError if ``record`` is not stable: the file's name promises a stable setting.
    """
    from trainer.config import TrainConfig
    from trainer.yaml_io import parse_yaml

    if record is None:
        return None
    rules = rules or StabilityRules()
    v = verdict(record, rules)
    if not v.stable:
        raise ValueError(f"trial {record.trial_id} is not stable ({v.kind}: {v.reasons})")
    path = Path(path)
    text = _best_yaml_text(record, v, rules, sweep_name, path.parent.resolve() / BEST_RUNS_DIR)
    # Validate before replacing the previous file: a bad dump must never clobber a good one.
    # The schema only: the paths are the trial's, which a copied sweep dir may not have.
    parsed = parse_yaml(text, str(path))
    if not isinstance(parsed, dict) or "phase2" not in parsed:
        raise RuntimeError("generated best-stable YAML does not parse back to a phase2 mapping")
    if len(parsed) > 1:  # a whole config (from the trial's resolved one): the trainer's schema
        TrainConfig.model_validate(parsed)
    return atomic_write_text(path, text)


def trial_resolved_config(record: TrialRecord) -> dict[str, Any] | None:
    """The whole config the trial ran (its run dir's config.resolved.yaml), if on disk."""
    from trainer.yaml_io import load_yaml_file

    if record.run_dir is None or not (record.run_dir / RESOLVED_CONFIG).is_file():
        return None
    data = load_yaml_file(record.run_dir / RESOLVED_CONFIG)
    if not isinstance(data, dict):
        raise ValueError(f"{record.run_dir / RESOLVED_CONFIG}: expected a mapping")
    return data


def _best_yaml_text(record: TrialRecord, v: Verdict, rules: StabilityRules, sweep: str,
                    runs_dir: Path) -> str:
    from trainer.yaml_io import dump_yaml

    resolved = trial_resolved_config(record)
    if resolved is None:
        config = phase2_config(record.params)
        rest: dict[str, Any] = {}
        source = ["only its phase2 knobs are known (no config.resolved.yaml in a run "
                  "directory): the other sections are the trainer's defaults"]
    else:
        ran = dict(resolved.get("phase2") or {})
        # Seed order first; any knob the list does not know yet still comes along.
        config = {**phase2_config(ran), **{k: x for k, x in ran.items()
                                           if k not in PHASE2_KNOBS}}
        rest = {k: x for k, x in resolved.items() if k != "phase2"}
        rest["output"] = {**(rest.get("output") or {}), "root": str(runs_dir),
                          "run_name": None}
        source = [f"the whole config the trial ran: {record.run_dir / RESOLVED_CONFIG}",
                  "every path is absolute (the trial's own LLM, Phase 1 and manifest); "
                  f"runs go to {runs_dir}", "(python -m trainer THIS_FILE trains the tuned "
                  "model; --set output.root=DIR puts the run elsewhere)"]
    loss = "n/a" if v.final_loss is None else f"{v.final_loss:.4g}"
    lines = [
        f"# best stable config from sweep {sweep}, trial {record.trial_id}: "
        f"smoothed final loss {loss} ({v.final_loss_source or 'no'} loss)",
        *(f"# {line}" for line in _explanation(record, v, rules)),
        *(f"# {line}" for line in source),
        "phase2:",
    ]
    base = finite_or_none(config.get("learning_rate"))
    for key, value in config.items():
        lines.append(f"  {key}: {yaml_scalar(value)}{_knob_comment(key, value, base)}")
    return "\n".join(lines) + "\n" + (dump_yaml(rest) if rest else "")


def _explanation(record: TrialRecord, v: Verdict, rules: StabilityRules) -> list[str]:
    pctl = "n/a" if v.grad_norm_pctl is None else fmt_num(v.grad_norm_pctl)
    clipped = "n/a" if v.clip_fraction is None else f"{v.clip_fraction:.0%}"
    how = "early-stopped by the scheduler" if v.early_stopped else (record.end_reason or "ended")
    return [
        f"ranked first among stable trials; {v.steps} steps, {how}",
        f"observed: p{rules.grad_norm_percentile:g} grad norm {pctl} "
        f"(limit {rules.grad_norm_limit:g}), {v.nan_count} NaN events "
        f"(limit {rules.max_nan_events}), clip acted on {clipped} of steps (reported, "
        "not a rule: the seed's remedy)",
        "stable = no NaN beyond the limit, smoothed loss never above "
        f"{rules.loss_spike_factor:g}x its start"
        + (" and ending below it" if rules.final_above_start else ""),
        "projector_lr / lora_lr: AdamW groups 'projector' and 'lora' (seed default 5x / 0.5x "
        "learning_rate); linear warmup for warmup_steps, then cosine decay to 0",
    ]


def _knob_comment(key: str, value: Any, base: float | None) -> str:
    number = finite_or_none(value)
    if key in ("projector_lr", "lora_lr") and number is not None and base:
        return f"  # {number / base:.3g}x learning_rate"
    if key == "gradient_clip_val" and not value:  # the trainer treats null and 0 as off
        return "  # no clipping"
    return ""


def yaml_scalar(value: Any) -> str:
    """One YAML scalar that yaml.safe_load reads back with the same type.

    Floats need care: PyYAML (YAML 1.1) reads ``1e-4`` as a *string* and ``2`` as an int, so
    every float gets a decimal point and a signed exponent (``5.0e-05``, ``2.0``).
    """
    if isinstance(value, float) and not isinstance(value, bool):
        return _yaml_float(value)
    if isinstance(value, list | tuple):  # e.g. adam_betas; safe_dump cannot represent tuples
        return "[" + ", ".join(yaml_scalar(item) for item in value) + "]"
    # Unlimited width: PyYAML folds long strings onto continuation lines otherwise, which
    # would break the one-knob-per-line layout (and the inline comments).
    dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return dumped.removesuffix("\n").removesuffix("\n...").strip()


def _yaml_float(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    # 12 significant digits: drops float noise like 0.0005000000000000001 from 5 * 1e-4.
    text = f"{value:.12g}"
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent}" if exponent else mantissa


__all__ = [
    "BEST_RUNS_DIR",
    "best_stable_config",
    "phase2_config",
    "trial_resolved_config",
    "write_best_stable_yaml",
    "yaml_scalar",
]
