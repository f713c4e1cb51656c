"""What a person sees: the sweep in the MLflow web UI, in headless Chromium.

A small sweep is written with SweepTracker into a SQLite store, ``mlflow server`` serves it on
127.0.0.1, and Chromium (Debian's /usr/bin/chromium driven by the ``playwright`` package; no
``playwright install``) checks that the child runs are listed under the parent, and that a run
shows its params and its loss chart. Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from test_mlflow_server import MlflowServer, free_port

from tuning.tracking import SweepTracker

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
# MLflow 3 opens experiments in its GenAI (traces) view unless asked for the training view.
TRAINING_VIEW = "workflowType=machine_learning"
UI_TIMEOUT_MS = 60_000


def populate(tmp_path: Path) -> tuple[str, str, str, dict[str, str]]:
    """A parent and three trial runs; returns (store uri, experiment id, parent id, runs)."""
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    tracker = SweepTracker(uri, "phase2-ui", tmp_path / "state")
    parent = tracker.start_parent("ui-sweep", {"num_samples": 3})
    assert parent
    runs = {}
    for index, lr in enumerate([1e-4, 3e-4, 1e-3]):
        trial_id = f"ui000_0000{index}"
        name = f"phase2_trainable_{trial_id}"
        runs[name] = tracker.start_trial(trial_id, run_name=name)
        tracker.log_params(
            trial_id,
            {
                "learning_rate": lr,
                "projector_lr_mult": 5.0,
                "lora_lr_mult": 0.5,
                "gradient_clip_val": None,
                "warmup_steps": 10,
            },
        )
        tracker.log_records(
            trial_id,
            [
                {"step": s, "loss": 3.0 / (1 + 0.03 * s * (index + 1)), "grad_norm": 1.0}
                for s in range(1, 81)
            ],
        )
        tracker.finish_trial(trial_id, "FINISHED")
    tracker.finish_parent("FINISHED")
    experiment_id = tracker.client.get_experiment_by_name("phase2-ui").experiment_id
    return uri, experiment_id, parent, runs



def test_sweep_is_readable_in_the_mlflow_ui(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium missing: apt-get install -y chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Python package playwright missing: pip install playwright"
    )
    uri, experiment_id, parent_id, runs = populate(tmp_path)
    server = MlflowServer(free_port(), uri, tmp_path / "artifacts", tmp_path / "server.log")
    server.start()
    base = server.url
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(UI_TIMEOUT_MS)

                # experiment page: the parent row, expanded, lists every trial's child run
                page.goto(f"{base}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}")
                parent_link = page.locator(f'a[href$="/runs/{parent_id}"]')
                parent_link.first.wait_for()
                expander = (
                    page.get_by_role("gridcell").filter(has=parent_link).get_by_role("button")
                )
                expander.first.click()
                for name in runs:
                    page.get_by_text(name, exact=True).first.wait_for()
                page.screenshot(path=str(tmp_path / "experiment.png"), full_page=True)

                # one run: its params on the overview, its loss chart under "Model metrics"
                name, run_id = sorted(runs.items())[0]
                page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}")
                page.get_by_text(name, exact=True).first.wait_for()
                for param, value in (("learning_rate", "0.0001"), ("gradient_clip_val", "none")):
                    row = page.get_by_role("row").filter(has_text=param)
                    row.first.wait_for()
                    assert value in row.first.inner_text(), param
                row.first.scroll_into_view_if_needed()  # the page scrolls inside a pane
                page.screenshot(path=str(tmp_path / "run-overview.png"), full_page=True)

                page.get_by_role("tab", name="Model metrics").click()
                page.get_by_text(f"{name} (loss)").first.wait_for()
                chart = page.locator(".js-plotly-plot").filter(has_text="Step")
                chart.first.wait_for()
                page.screenshot(path=str(tmp_path / "run-metrics.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()
    for shot in ("experiment.png", "run-overview.png", "run-metrics.png"):
        assert (tmp_path / shot).stat().st_size > 10_000, shot
    print(f"screenshots in {tmp_path}")
