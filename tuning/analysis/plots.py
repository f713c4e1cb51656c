"""Sweep plots as PNG files: loss curves, LR schedule, stability map, gradient norms.

Figures are built on an explicit Agg canvas instead of pyplot: no display is ever needed, no
global figure registry leaks memory in a long-running driver, and it is safe to call from
worker threads.  Missing (None) metric values become gaps, never zeros.
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter

from trainer.fsutil import atomic_write_bytes
from tuning.analysis.leaderboard_table import knob_text
from tuning.analysis.stability import KINDS, Verdict, index_verdicts
from tuning.analysis.trial_record import TrialRecord, finite_or_none, swept_values

DPI = 120

KIND_COLORS = {
    "stable": "#2ca02c",
    "plateaued": "#bcbd22",
    "nan": "#d62728",
    "diverged": "#ff7f0e",
    "high_grad_norm": "#9467bd",
    "failed": "#333333",
    "incomplete": "#17becf",
}
KIND_LABELS = {
    "stable": "stable",
    "plateaued": "plateaued",
    "nan": "NaN",
    "diverged": "diverged",
    "high_grad_norm": "high grad norm",
    "failed": "failed",
    "incomplete": "incomplete",
}
GROUP_COLORS = {"projector": "#1f77b4", "lora": "#ff7f0e"}

# Seed: grad norm 0.1-10 is normal, above 100 needs clipping.
GRAD_NORM_NORMAL_MAX = 10.0
GRAD_NORM_CLIP_NEEDED = 100.0
# Knobs the stability map can put on an axis, in the order that breaks ties between equally
# varied ones (the seed's main levers first).
MAP_KNOBS = (
    "learning_rate", "gradient_clip_val", "projector_lr_mult", "lora_lr_mult", "warmup_steps",
    "weight_decay", "batch_size", "gradient_accumulation_steps", "epochs",
)
MAX_MAP_PANELS = 4
# Up to this many distinct whole-number values, an axis is ticked at exactly those values.
MAX_INT_TICKS = 8
# Beyond this many trials, per-line id labels pile up into an unreadable column.
MAX_LINE_LABELS = 12


def plot_loss_curves(
    records: Sequence[TrialRecord],
    verdicts: Mapping[str, Verdict] | Sequence[Verdict],
    path: str | Path,
) -> Path:
    """Training loss per trial, coloured by verdict kind; x marks NaN events."""
    by_id = index_verdicts(records, verdicts)
    fig, ax = _new_figure(10, 6)
    best = _best_stable_id(by_id)
    all_losses: list[float] = []
    for record in records:
        v = by_id[record.trial_id]
        steps, losses = _metric_with_gaps(record, "loss")
        all_losses += [x for x in losses if np.isfinite(x)]
        ax.plot(
            steps,
            losses,
            color=KIND_COLORS[v.kind],
            linestyle="--" if v.early_stopped else "-",
            linewidth=2.6 if record.trial_id == best else 1.0,
            alpha=1.0 if record.trial_id == best else 0.7,
            zorder=3 if record.trial_id == best else 2,
        )
        _mark_nan_events(ax, record, steps, losses)
        if len(records) <= MAX_LINE_LABELS:
            _label_line_end(ax, record.trial_id, steps, losses, KIND_COLORS[v.kind])
    if len(records) <= MAX_LINE_LABELS:
        ax.margins(x=0.07)  # room on the right for the end-of-line trial ids
    if _wide_range(all_losses):
        ax.set_yscale("log")  # a diverged run would otherwise flatten every other curve
    ax.set(title="Training loss by trial", xlabel="optimizer step", ylabel="training loss")
    ax.grid(True, alpha=0.3)
    # Outside the axes: inside, it would hide whichever curve happens to run under it.
    ax.legend(
        handles=_loss_legend(records, by_id, best),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="verdict (trials)",
        title_fontsize=8,
    )
    _no_data_note(ax, not all_losses, "no finite loss values")
    return _save(fig, path)


def _label_line_end(ax: Axes, text: str, steps: np.ndarray, values: np.ndarray, color: str) -> None:
    # Colour says the verdict; the id at the curve's end says which trial it is.
    finite = np.isfinite(values)
    if finite.any():
        ax.annotate(text, (steps[finite][-1], values[finite][-1]), color=color, fontsize=7,
                    xytext=(3, 0), textcoords="offset points", va="center")  # fmt: skip


def _best_stable_id(by_id: Mapping[str, Verdict]) -> str | None:
    ranked = [
        (v.early_stopped, v.final_loss, trial_id)
        for trial_id, v in by_id.items()
        if v.stable and v.final_loss is not None
    ]
    return min(ranked)[2] if ranked else None


def _mark_nan_events(ax: Axes, record: TrialRecord, steps: np.ndarray, losses: np.ndarray) -> None:
    # Put each marker at the last finite loss before the event, so it sits on the curve.
    event_steps = sorted({int(e["step"]) for e in record.nan_events if e.get("step") is not None})
    for step in event_steps:
        before = np.isfinite(losses) & (steps <= step)
        if before.any():
            y = losses[before][-1]
            ax.plot([step], [y], marker="x", color=KIND_COLORS["nan"], markersize=9, zorder=4)


def _loss_legend(
    records: Sequence[TrialRecord], by_id: Mapping[str, Verdict], best: str | None
) -> list[Any]:
    counts = Counter(by_id[r.trial_id].kind for r in records)
    handles: list[Any] = [
        Line2D([], [], color=KIND_COLORS[kind], label=f"{KIND_LABELS[kind]} ({counts[kind]})")
        for kind in KINDS
        if counts[kind]
    ]
    if best is not None:
        handles.append(Line2D([], [], color=KIND_COLORS["stable"], lw=2.6, label=f"best: {best}"))
    if any(by_id[r.trial_id].early_stopped for r in records):
        handles.append(Line2D([], [], color="grey", linestyle="--", label="early-stopped"))
    if any(r.nan_events for r in records):
        handles.append(
            Line2D([], [], color=KIND_COLORS["nan"], marker="x", lw=0, label="NaN event")
        )
    return handles


def plot_lr_schedule(record: TrialRecord, path: str | Path) -> Path:
    """lr/projector and lr/lora over steps (one panel each, shared x: the groups differ ~10x)."""
    fig = _figure(10, 6)
    axes = fig.subplots(2, 1, sharex=True)
    warmup = record.params.get("warmup_steps")
    any_data = False
    for ax, group in zip(axes, ("projector", "lora"), strict=True):
        steps, lrs = _metric_with_gaps(record, f"lr/{group}")
        any_data |= bool(np.isfinite(lrs).any())
        peak = np.nanmax(lrs) if np.isfinite(lrs).any() else None
        label = f"lr/{group}" + (f" (peak {peak:.3g})" if peak is not None else "")
        ax.plot(steps, lrs, color=GROUP_COLORS[group], linewidth=1.8, label=label)
        if isinstance(warmup, int | float) and warmup > 0:
            ax.axvline(warmup, color="grey", linestyle=":", label=f"end of warmup ({warmup:g})")
        ax.set_ylabel(f"{group} learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(f"Learning-rate schedule, trial {record.trial_id} (linear warmup, cosine decay)")
    _no_data_note(axes[0], not any_data, "no learning-rate values logged")
    return _save(fig, path)


def map_value(record: TrialRecord, knob: str) -> float | None:
    """A knob's value for the map: group multipliers as the trainer derives them; clipping
    off (null or 0) as 0."""
    if knob == "learning_rate":
        return record.base_lr
    if knob == "projector_lr_mult":
        return record.projector_lr_mult
    if knob == "lora_lr_mult":
        return record.lora_lr_mult
    value = record.params.get(knob)
    if knob == "gradient_clip_val" and not value:
        return 0.0
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class KnobValues:
    """Each trial's number for each knob the map can place: MAP_KNOBS through ``map_value``,
    any other swept key (``model.lora.r``, ``phase2.seed``, a list such as
    ``model.lora.target_modules``) from ``swept_values``; a value that is not a number is a
    category, placed at its index among the knob's sorted distinct values."""

    def __init__(self, records: Sequence[TrialRecord],
                 swept_keys: Sequence[str] | None = None) -> None:
        extra = [k.removeprefix("phase2.") for k in swept_keys or ()]
        extra = [k for k in dict.fromkeys(extra) if k not in MAP_KNOBS]
        self.knobs = [*MAP_KNOBS, *extra]
        # Read once: a dotted key's value lives in each trial's config.resolved.yaml.
        self._raw = {r.trial_id: swept_values(r, extra) for r in records}
        self.categories: dict[str, list[str]] = {}
        for knob in extra:
            raw = [v[knob] for v in self._raw.values() if knob in v]
            if any(finite_or_none(x) is None for x in raw):
                self.categories[knob] = sorted({knob_text(x) for x in raw})

    def __call__(self, record: TrialRecord, knob: str | None) -> float | None:
        if knob is None:
            return 0.0
        if knob in MAP_KNOBS:
            return map_value(record, knob)
        raw = self._raw.get(record.trial_id, {})
        if knob not in raw:
            return None
        if knob in self.categories:
            return float(self.categories[knob].index(knob_text(raw[knob])))
        return finite_or_none(raw[knob])


def map_axes(records: Sequence[TrialRecord], swept_keys: Sequence[str] | None = None,
             values: KnobValues | None = None) -> list[str]:
    """The knobs that varied across ``records``, most varied first: more distinct values
    first, then the wider spread (decades for positive values), then MAP_KNOBS order, then
    the other ``swept_keys`` in their order."""
    lookup = values or KnobValues(records, swept_keys)
    scored = []
    for order, knob in enumerate(lookup.knobs):
        known = [v for v in (lookup(r, knob) for r in records) if v is not None]
        distinct = sorted(set(known))
        if len(distinct) < 2:
            continue
        positive = [v for v in distinct if v > 0]
        spread = (0.0 if knob in lookup.categories  # an index has no spread to speak of
                  else np.log10(positive[-1] / positive[0]) if len(positive) >= 2
                  else distinct[-1] - distinct[0])
        scored.append((-len(distinct), -float(spread), order, knob))
    return [knob for *_, knob in sorted(scored)]


def plot_stability_map(
    records: Sequence[TrialRecord],
    verdicts: Mapping[str, Verdict] | Sequence[Verdict],
    path: str | Path,
    swept_keys: Sequence[str] | None = None,
) -> Path:
    """``stability_map_figure`` saved as a PNG."""
    return _save(stability_map_figure(records, verdicts, swept_keys), path)


def stability_map_figure(
    records: Sequence[TrialRecord],
    verdicts: Mapping[str, Verdict] | Sequence[Verdict],
    swept_keys: Sequence[str] | None = None,
) -> Figure:
    """Outcome per trial over the two knobs that varied most (``map_axes``, the search
    space's ``swept_keys`` included); with more than two varied, one panel per further knob
    against the most varied one.  The lowest value of the x knob where a trial went
    NaN/diverged is marked: the cliff."""
    by_id = index_verdicts(records, verdicts)
    value = KnobValues(records, swept_keys)
    axes_knobs = map_axes(records, values=value)
    x_knob = axes_knobs[0] if axes_knobs else "learning_rate"
    y_knobs = axes_knobs[1 : 1 + MAX_MAP_PANELS] or [None]
    fig = _figure(min(7.0 * len(y_knobs), 24.0), 6)
    panels = fig.subplots(1, len(y_knobs), squeeze=False)[0]
    placed = [r for r in records if value(r, x_knob) is not None]
    for ax, y_knob in zip(panels, y_knobs, strict=True):
        _map_panel(ax, placed, by_id, x_knob, y_knob, value)
    title = (f"Stability map: {' / '.join(axes_knobs)} varied" if axes_knobs
             else "Stability map: no knob varied")
    if len(axes_knobs) > 1 + MAX_MAP_PANELS:  # say which varied knobs have no panel
        title += f" (no panel: {', '.join(axes_knobs[1 + MAX_MAP_PANELS:])})"
    fig.suptitle(title)
    _no_data_note(panels[0], not placed, "no trials with a value for the varied knobs")
    return fig


def _map_panel(ax: Axes, records: Sequence[TrialRecord], by_id: Mapping[str, Verdict],
               x_knob: str, y_knob: str | None, value: KnobValues) -> None:
    points = [(value(r, x_knob), value(r, y_knob), r) for r in records]
    points = [(x, y, r) for x, y, r in points if x is not None and y is not None]
    categories = value.categories
    log_x = x_knob not in categories and _log_axis([x for x, _, _ in points])
    log_y = (y_knob is not None and y_knob not in categories
             and _log_axis([y for _, y, _ in points]))
    xs = _spread_duplicates([(x, y) for x, y, _ in points], log_x)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, (_, _, record) in enumerate(points):
        groups[_map_category(by_id[record.trial_id].kind)].append(index)
    for category, (marker, color, label) in _MAP_STYLES.items():
        idx = groups.get(category, [])
        if idx:
            ax.scatter([xs[i] for i in idx], [points[i][1] for i in idx], marker=marker,
                       color=color, s=90, alpha=0.8, edgecolors="black", linewidths=0.5,
                       label=f"{label} ({len(idx)})", zorder=3)  # fmt: skip
    if len(points) <= 30:  # trial ids stay legible up to about this many points
        _label_points(ax, points)
    cliff = (None if x_knob in categories  # "lowest" means nothing for a category
             else cliff_value([r for _, _, r in points], by_id, x_knob, value))
    if cliff is not None:
        ax.axvline(cliff, color=KIND_COLORS["nan"], linestyle="--", lw=1.2,
                   label=f"cliff: lowest {x_knob} that broke ({cliff:g})")
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if cliff is not None:  # shade everything past the cliff, so it reads at a glance
        right = ax.get_xlim()[1]
        ax.axvspan(cliff, right, color=KIND_COLORS["nan"], alpha=0.07, zorder=1)
        ax.set_xlim(right=right)
    if y_knob == "gradient_clip_val":
        ticks = sorted({y for _, y, _ in points})
        ax.set_yticks(ticks, ["none" if t == 0 else f"{t:g}" for t in ticks])
    for knob, axis, at in ((x_knob, ax.xaxis, 0), (y_knob, ax.yaxis, 1)):
        if knob in categories:
            names = categories[knob]
            axis.set_ticks(range(len(names)), names, fontsize=8)
        elif knob not in (None, "gradient_clip_val"):
            ticks = sorted({point[at] for point in points})
            # A few whole numbers (LoRA rank, warmup steps) read best as themselves; a log
            # axis would print 4x10^0 and label its minor ticks too.
            if len(ticks) <= MAX_INT_TICKS and all(float(t).is_integer() for t in ticks):
                axis.set_ticks(ticks, [f"{t:g}" for t in ticks])
                axis.set_minor_formatter(NullFormatter())
    if points:
        ax.legend(loc="best", fontsize=8)
    ax.set(xlabel=x_knob + (" (log scale)" if log_x else ""),
           ylabel=y_knob or "(only one knob varied)", title=f"{x_knob} x {y_knob or '-'}")
    ax.grid(True, which="both", alpha=0.3)


def cliff_value(records: Sequence[TrialRecord], verdicts: Mapping[str, Verdict],
                knob: str,
                value: Callable[[TrialRecord, str], float | None] = map_value) -> float | None:
    """Lowest value of ``knob`` at which a trial went NaN, diverged or ran a grad norm above
    the limit: where the map draws the cliff (None when nothing broke)."""
    broke = [value(r, knob) for r in records if verdicts[r.trial_id].kind in _CLIFF_KINDS]
    known = [v for v in broke if v is not None]
    return min(known) if known else None


def _log_axis(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > 10


_MAP_STYLES = {
    "stable": ("o", KIND_COLORS["stable"], "stable"),
    "plateaued": ("o", KIND_COLORS["plateaued"], "plateaued (stable, learned little)"),
    "nan": ("X", KIND_COLORS["nan"], "NaN"),
    "diverged": ("^", KIND_COLORS["diverged"], "diverged"),
    "high_grad_norm": ("v", KIND_COLORS["high_grad_norm"], "grad norm > limit"),
    "other": ("s", "#7f7f7f", "other (failed / incomplete)"),
}
_CLIFF_KINDS = ("nan", "diverged", "high_grad_norm")


def _map_category(kind: str) -> str:
    return kind if kind in _MAP_STYLES else "other"


def _label_points(ax: Axes, points: Sequence[tuple[float, float, TrialRecord]]) -> None:
    """One label per (x, y) point listing its trials, so the ids of repeated settings do not
    print on top of each other."""
    groups: dict[tuple[float, float], list[str]] = defaultdict(list)
    for x, y, record in points:
        groups[(x, y)].append(record.trial_id)
    for (x, y), ids in groups.items():
        text = ", ".join(ids[:4]) + (f" +{len(ids) - 4}" if len(ids) > 4 else "")
        ax.annotate(text, (x, y), fontsize=7, ha="center", xytext=(0, 9),
                    textcoords="offset points")  # fmt: skip


def _spread_duplicates(keys: Sequence[tuple[float, float]], log_x: bool) -> list[float]:
    """x positions with trials at identical (x, y) nudged apart (a few % in log space, or a
    little on a linear axis), e.g. repeated seeds, so none hides behind another."""
    totals = Counter(keys)
    seen: Counter[tuple[float, float]] = Counter()
    span = (max(k[0] for k in keys) - min(k[0] for k in keys)) if keys else 0.0
    xs = []
    for key in keys:
        offset = seen[key] - (totals[key] - 1) / 2
        seen[key] += 1
        xs.append(key[0] * 10 ** (0.025 * offset) if log_x
                  else key[0] + 0.01 * (span or 1.0) * offset)
    return xs


def plot_grad_norms(records: Sequence[TrialRecord], path: str | Path) -> Path:
    """Box plots of grad_norm/projector and grad_norm/lora per trial, seed thresholds marked."""
    width = min(30.0, max(8.0, 0.9 * len(records) + 3))
    fig, ax = _new_figure(width, 6)
    ticks: list[float] = []
    all_values: list[float] = []
    for index, record in enumerate(records):
        centre = index * 3.0 + 1.5
        ticks.append(centre)
        for offset, group in ((-0.5, "projector"), (0.5, "lora")):
            values = record.series(f"grad_norm/{group}")[1]
            if values:
                all_values += values
                _box(ax, values, centre + offset, GROUP_COLORS[group])
    if all_values and min(all_values) > 0:
        ax.set_yscale("log")  # norms span decades; 0.1-10 normal vs >100 must both show
    ax.axhline(GRAD_NORM_NORMAL_MAX, color="grey", linestyle="--", lw=1)
    ax.axhline(GRAD_NORM_CLIP_NEEDED, color=KIND_COLORS["nan"], linestyle=":", lw=1)
    ax.set_xticks(ticks, [r.trial_id for r in records], rotation=45, ha="right", fontsize=8)
    ax.set(title="Gradient norm per parameter group", xlabel="trial", ylabel="gradient norm")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles=_grad_legend(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _no_data_note(ax, not all_values, "no per-group gradient norms logged")
    return _save(fig, path)


def _box(ax: Axes, values: list[float], position: float, color: str) -> None:
    parts = ax.boxplot(
        [values], positions=[position], widths=0.8, patch_artist=True,
        flierprops={"markersize": 3, "markerfacecolor": color, "alpha": 0.6},
        medianprops={"color": "black"},
    )  # fmt: skip
    for patch in parts["boxes"]:
        patch.set_facecolor(color)
        patch.set_alpha(0.6)


def _grad_legend() -> list[Any]:
    return [
        Patch(color=GROUP_COLORS["projector"], alpha=0.6, label="grad_norm/projector"),
        Patch(color=GROUP_COLORS["lora"], alpha=0.6, label="grad_norm/lora"),
        Line2D([], [], color="grey", linestyle="--", label="10: top of normal range (seed)"),
        Line2D([], [], color=KIND_COLORS["nan"], linestyle=":", label="100: clip (seed)"),
    ]


# --------------------------------------------------------------------------- helpers


def _metric_with_gaps(record: TrialRecord, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values with NaN where the value was None: matplotlib breaks the line there."""
    steps, values = [], []
    for index, row in enumerate(record.history, start=1):
        if key not in row:
            continue
        value = row[key]
        steps.append(float(row.get("step", index)))
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        values.append(float(value) if is_number else np.nan)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _wide_range(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > 50


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = _figure(width, height)
    return fig, fig.add_subplot()


def _no_data_note(ax: Axes, empty: bool, message: str) -> None:
    if empty:
        ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="grey")  # fmt: skip


def _save(fig: Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return atomic_write_bytes(path, buffer.getvalue())


__all__ = [
    "KIND_COLORS",
    "KnobValues",
    "cliff_value",
    "map_axes",
    "map_value",
    "plot_grad_norms",
    "plot_loss_curves",
    "plot_lr_schedule",
    "plot_stability_map",
    "stability_map_figure",
]
