"""Plots are written as real, non-empty PNGs, including for sparse or None-ridden data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tuning.analysis.plots import (
    cliff_value,
    map_axes,
    plot_grad_norms,
    plot_loss_curves,
    plot_lr_schedule,
    plot_stability_map,
    stability_map_figure,
)
from tuning.analysis.stability import verdicts_for
from tuning.analysis.trial_record import TrialRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def schedule(step: int, steps: int, warmup: int) -> float:
    if step <= warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def trial(
    trial_id: str,
    lr: float,
    mult: float = 5.0,
    steps: int = 120,
    nan_at: int | None = None,
    diverge: bool = False,
    grad: float = 2.0,
    **kwargs: Any,
) -> TrialRecord:
    rows = []
    for step in range(1, steps + 1):
        loss = 1.0 + 2.0 * math.exp(-step / 30) + (step / 8 if diverge else 0.0)
        bad = step == nan_at
        rows.append(
            {
                "step": step,
                "loss": None if bad else loss,
                "grad_norm": None if bad else grad * (1 + 0.3 * math.sin(step)),
                "grad_norm/projector": None if bad else grad * (1 + 0.3 * math.sin(step)),
                "grad_norm/lora": None if bad else grad / 4 * (1 + 0.2 * math.cos(step)),
                "lr/projector": lr * mult * schedule(step, steps, 20),
                "lr/lora": lr * 0.5 * schedule(step, steps, 20),
                "clipped": 0,
                "skipped": int(bad),
                "nan_events": int(nan_at is not None and step >= nan_at),
            }
        )
    events = [{"step": nan_at, "where": "loss", "groups": ["lora"]}] if nan_at else []
    return TrialRecord(
        trial_id=trial_id,
        params={"learning_rate": lr, "projector_lr_mult": mult, "warmup_steps": 20},
        history=rows,
        status=kwargs.get("status", "TERMINATED"),
        end_reason=kwargs.get("end_reason", "completed"),
        nan_events=events,
    )


@pytest.fixture
def records() -> list[TrialRecord]:
    return [
        trial("s1", 5e-5),
        trial("s2", 1e-4),
        trial("s2_seed2", 1e-4),  # same point on the map: must be spread, not hidden
        trial("s3", 1e-4, mult=10.0, end_reason="early_stopped", steps=50),
        trial("n1", 4e-4, nan_at=60),
        trial("d1", 3e-4, diverge=True),
        trial("g1", 2e-4, grad=400.0),
        trial("e1", 1e-4, steps=5, status="ERROR", end_reason="error"),
        TrialRecord("p1", {"learning_rate": 1e-4}, [], "PENDING", None, []),
    ]


def assert_png(path: Path, min_size: tuple[int, int] = (600, 400)) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as image:
        image.verify()  # raises on a truncated / corrupt file
    with Image.open(path) as image:
        assert image.width >= min_size[0] and image.height >= min_size[1]
        pixels = np.asarray(image.convert("L"))
    # Something was drawn: not a blank canvas.
    assert pixels.std() > 5


def test_loss_curves_png(records: list[TrialRecord], tmp_path: Path) -> None:
    path = plot_loss_curves(records, verdicts_for(records), tmp_path / "plots" / "loss.png")
    assert path == tmp_path / "plots" / "loss.png"
    assert_png(path)


def test_loss_curves_accept_verdict_list(records: list[TrialRecord], tmp_path: Path) -> None:
    verdicts = list(verdicts_for(records).values())
    assert_png(plot_loss_curves(records, verdicts, tmp_path / "loss.png"))


def test_lr_schedule_png(records: list[TrialRecord], tmp_path: Path) -> None:
    assert_png(plot_lr_schedule(records[1], tmp_path / "lr.png"))


def test_lr_schedule_without_lr_values(tmp_path: Path) -> None:
    empty = TrialRecord("x", {}, [{"step": 1, "loss": 2.0}], "RUNNING", None, [])
    assert_png(plot_lr_schedule(empty, tmp_path / "lr.png"))


def test_stability_map_png(records: list[TrialRecord], tmp_path: Path) -> None:
    assert_png(plot_stability_map(records, verdicts_for(records), tmp_path / "map.png"))


def _with(record: TrialRecord, **params: Any) -> TrialRecord:
    record.params.update(params)
    return record


def test_map_axes_are_the_two_knobs_that_varied_not_a_constant_multiplier() -> None:
    # The issue-20 grid: learning_rate 1e-4..1e-1 x clip none/1.0, multiplier constant at 5.
    grid = [_with(trial(f"t{i}{c}", lr), gradient_clip_val=c)
            for i, lr in enumerate((1e-4, 1e-3, 1e-2, 1e-1)) for c in (None, 1.0)]
    assert map_axes(grid) == ["learning_rate", "gradient_clip_val"]
    # More distinct values win over the list order; equal counts go to the wider spread.
    five = [_with(trial(f"w{i}", (1e-3, 2e-3, 3e-3)[i % 3]), warmup_steps=10 * (i + 1),
                  weight_decay=(0.0, 0.1)[i % 2]) for i in range(5)]
    assert map_axes(five) == ["warmup_steps", "learning_rate", "weight_decay"]  # 5, 3, 2 values
    spread = [_with(trial(f"v{i}", 10.0 ** -(i + 1)), warmup_steps=10 * (i + 1))
              for i in range(4)]
    assert map_axes(spread)[:2] == ["learning_rate", "warmup_steps"]  # 3 decades vs 0.6


def test_map_draws_one_panel_per_further_varied_knob(tmp_path: Path) -> None:
    three = [_with(trial(f"t{i}", lr, mult=m), gradient_clip_val=c)
             for i, (lr, m, c) in enumerate([(1e-4, 5.0, None), (1e-3, 10.0, 1.0),
                                             (1e-2, 5.0, 0.5), (1e-1, 10.0, None)])]
    assert map_axes(three) == ["learning_rate", "gradient_clip_val", "projector_lr_mult"]
    path = plot_stability_map(three, verdicts_for(three), tmp_path / "map3.png")
    with Image.open(path) as image:
        width = image.width
    two = [*three[:1], _with(trial("u", 1e-2), gradient_clip_val=1.0)]
    with Image.open(plot_stability_map(two, verdicts_for(two), tmp_path / "map2.png")) as image:
        assert width > 1.7 * image.width  # two panels side by side vs one


def test_map_places_dotted_and_list_valued_swept_keys(tmp_path: Path) -> None:
    """model.lora.r (a number) and model.lora.target_modules (a list, one category per
    distinct list) come from each trial's config.resolved.yaml and get an axis each."""
    import yaml

    records = []
    for i, (r, modules) in enumerate([(4, ["q_proj"]), (16, ["q_proj", "v_proj"]),
                                      (64, ["q_proj"])]):
        record = trial(f"t{i}", 1e-3)
        record.run_dir = tmp_path / record.trial_id
        record.run_dir.mkdir()
        (record.run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(
            {"model": {"lora": {"r": r, "target_modules": modules}}}))
        records.append(record)
    keys = ["learning_rate", "model.lora.r", "model.lora.target_modules"]
    assert map_axes(records) == []  # the LR is constant: without the space nothing varied
    assert map_axes(records, keys) == ["model.lora.r", "model.lora.target_modules"]
    fig = stability_map_figure(records, verdicts_for(records), keys)
    (panel,) = fig.axes
    assert panel.get_xlabel() == "model.lora.r (log scale)"  # 4..64 spans more than 10x
    assert panel.get_ylabel() == "model.lora.target_modules"
    assert [t.get_text() for t in panel.get_yticklabels()] == ["q_proj", "q_proj,v_proj"]
    assert_png(plot_stability_map(records, verdicts_for(records), tmp_path / "map.png", keys))


def test_map_cliff_is_the_lowest_lr_that_broke(records: list[TrialRecord]) -> None:
    verdicts = verdicts_for(records)
    assert cliff_value(records, verdicts, "learning_rate") == 2e-4  # g1: grad norm 400
    healthy = [r for r in records if r.trial_id.startswith("s")]
    assert cliff_value(healthy, verdicts_for(healthy), "learning_rate") is None


def test_grad_norms_png(records: list[TrialRecord], tmp_path: Path) -> None:
    assert_png(plot_grad_norms(records, tmp_path / "grad.png"))


def test_plots_handle_empty_sweep(tmp_path: Path) -> None:
    assert_png(plot_loss_curves([], {}, tmp_path / "a.png"))
    assert_png(plot_stability_map([], {}, tmp_path / "b.png"))
    assert_png(plot_grad_norms([], tmp_path / "c.png"))


def test_plot_overwrites_atomically(records: list[TrialRecord], tmp_path: Path) -> None:
    target = tmp_path / "grad.png"
    target.write_bytes(b"stale")
    plot_grad_norms(records[:2], target)
    assert_png(target)
    assert [p.name for p in tmp_path.iterdir()] == ["grad.png"]  # no temp files left behind
