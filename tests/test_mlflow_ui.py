"""What a person sees: the sweep in the MLflow web UI, in headless Chromium.

A small sweep is written with SweepTracker into a SQLite store, ``mlflow server`` serves it on
127.0.0.1, and Chromium (Debian's /usr/bin/chromium driven by the ``playwright`` package; no
``playwright install``) opens the link the sweep prints (``tuning.tracking.names.runs_link``) and
checks: it lands on the "Model training" runs page, not the GenAI overview; the trials are
listed under their swept values and the parent run is not among them; a per-step loss chart is
drawn. Then one run's page shows its params and its loss chart. Screenshots go to
``runs/ci-artifacts/mlflow-ui/`` (``PHASE2_CI_ARTIFACTS`` overrides the root) so CI can keep them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from test_mlflow_server import MlflowServer, free_port

from tuning.tracking.names import runs_link, trial_run_name
from tuning.tracking.tracker import SweepTracker

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
UI_TIMEOUT_MS = 60_000
SWEPT = [
    {"learning_rate": 1e-4, "gradient_clip_val": None},
    {"learning_rate": 3e-4, "gradient_clip_val": 1.0},
    {"learning_rate": 1e-3, "gradient_clip_val": 5.0},
]


REPO = Path(__file__).resolve().parents[1]


def artifacts_dir() -> Path:
    """<repo>/runs/ci-artifacts/mlflow-ui, whatever the working directory: a stable place
    for CI to collect (runs/ is git-ignored). PHASE2_CI_ARTIFACTS replaces the
    <repo>/runs/ci-artifacts part."""
    root = Path(os.environ.get("PHASE2_CI_ARTIFACTS") or REPO / "runs" / "ci-artifacts")
    out = root / "mlflow-ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_screenshots_go_to_a_git_ignored_folder_of_the_repo(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("PHASE2_CI_ARTIFACTS", raising=False)
    monkeypatch.chdir(tmp_path)  # not the repo: the folder must not follow the cwd
    shots = artifacts_dir()
    assert shots == REPO / "runs" / "ci-artifacts" / "mlflow-ui" and shots.is_dir()
    if (REPO / ".git").exists():  # a clone (a worktree has a .git file): is it ignored?
        check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(shots)])
        assert check.returncode == 0, f"{shots} is not git-ignored"
    monkeypatch.setenv("PHASE2_CI_ARTIFACTS", str(tmp_path / "ci"))
    assert artifacts_dir() == tmp_path / "ci" / "mlflow-ui"


def populate(tmp_path: Path) -> tuple[str, SweepTracker, dict[str, str]]:
    """A parent and three trial runs, as the sweep writes them; returns (uri, tracker, runs)."""
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    tracker = SweepTracker(uri, "phase2-ui", tmp_path / "state")
    assert tracker.start_parent("ui-sweep", {"num_samples": 3})
    runs = {}
    start = time.time() - 3600
    for index, swept in enumerate(SWEPT):
        trial_id = f"ui000_0000{index}"
        name = trial_run_name(swept, trial_id)
        runs[name] = tracker.start_trial(trial_id, run_name=name)
        tracker.log_params(trial_id, {**swept, "warmup_steps": 10})
        tracker.log_records(
            trial_id,
            [
                {
                    "step": s,
                    "loss": 3.0 / (1 + 0.03 * s * (index + 1)),
                    "grad_norm": 1.0,
                    "wall_time": start + 2.0 * s,
                }
                for s in range(1, 81)
            ],
        )
        tracker.log_final_metrics(trial_id, {"final/loss": 3.0 / (1 + 2.4 * (index + 1))}, 80)
        tracker.finish_trial(trial_id, "FINISHED")
    tracker.finish_parent("FINISHED")
    return uri, tracker, runs


def test_run_names_and_step_times_reach_the_store(tmp_path: Path) -> None:
    """Without a browser: the names the UI lists and the timestamps its time axis plots."""
    _, tracker, runs = populate(tmp_path)
    assert sorted(runs) == [
        "lr=1e-3 clip=5 [00002]",
        "lr=1e-4 clip=none [00000]",
        "lr=3e-4 clip=1 [00001]",
    ]
    run_id = runs["lr=1e-4 clip=none [00000]"]
    history = tracker.client.get_metric_history(run_id, "loss")
    stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert stamps[1] - stamps[0] == 2000 and len(set(stamps)) == 80  # each step its own time
    assert "wall_time" not in tracker.client.get_run(run_id).data.metrics
    assert tracker.client.get_run(run_id).data.params["gradient_clip_val"] == "none"


def test_the_printed_link_keeps_the_parent_run_out_of_the_charts() -> None:
    """Without a browser: what MLflow 3.17's UI reads from the link. Its runs page fetches the
    parents of the runs it found (and so puts the parent in every chart legend) only with no
    search filter and no sort, or a sort by start time; the link has both, and the filter
    matches the trial runs only. No run tag hides a run from the charts (docs/sweeps.md)."""
    from urllib.parse import parse_qs, urlsplit

    link = runs_link("http://127.0.0.1:5000/", "7", "abc123")
    path, _, query = urlsplit(link).fragment.partition("?")
    params = {k: v[0] for k, v in parse_qs(query).items()}
    assert path == "/experiments/7/runs" and params["workflowType"] == "machine_learning"
    assert params["searchFilter"] == ("tags.`phase2tune.role` = 'trial' AND "
                                      "tags.`phase2tune.sweep_uid` = 'abc123'")
    assert params["orderByKey"] == "metrics.`final/loss`"  # not attributes.start_time


def test_sweep_is_readable_in_the_mlflow_ui(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium missing: apt-get install -y chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Python package playwright missing: pip install playwright"
    )
    uri, tracker, runs = populate(tmp_path)
    experiment_id, parent_id = tracker.experiment_id, tracker.parent_run_id
    shots = artifacts_dir()
    server = MlflowServer(free_port(), uri, tmp_path / "artifacts", tmp_path / "server.log")
    server.start()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                # A fresh browser profile: nothing remembered from an earlier visit.
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(UI_TIMEOUT_MS)

                page.goto(runs_link(server.url, experiment_id, tracker.sweep_uid))
                for name in runs:
                    page.get_by_role("link", name=name, exact=True).first.wait_for()
                # the training view, on the runs: its "Runs" nav item, not GenAI's "Traces"
                # overview (MLflow 3's default for a new browser)
                assert "/runs?" in page.url and "/overview" not in page.url
                for genai_only in ("Judges", "Sessions", "Detect Issues"):
                    assert page.get_by_text(genai_only, exact=True).count() == 0, genai_only
                page.get_by_text("Sort: final/loss", exact=True).first.wait_for()
                # the parent is neither a row nor in a legend: not on the page at all
                assert page.locator(f'a[href$="/runs/{parent_id}"]').count() == 0
                assert page.get_by_text("ui-sweep", exact=True).count() == 0
                assert page.get_by_text(f"{len(runs)} matching runs").count() == 1
                # a per-step chart of the trials' loss
                chart = page.locator(".js-plotly-plot").filter(has_text="Step")
                chart.first.wait_for()
                page.get_by_text("loss", exact=True).first.wait_for()
                page.screenshot(path=str(shots / "landing.png"), full_page=True)

                # one run: its params on the overview, its loss chart under "Model metrics"
                name, run_id = sorted(runs.items())[1]  # lr=1e-4 clip=none
                page.goto(f"{server.url}/#/experiments/{experiment_id}/runs/{run_id}"
                          "?workflowType=machine_learning")
                page.get_by_text(name, exact=True).first.wait_for()
                for param, value in (("learning_rate", "0.0001"), ("gradient_clip_val", "none")):
                    row = page.get_by_role("row").filter(has_text=param)
                    row.first.wait_for()
                    assert value in row.first.inner_text(), param
                row.first.scroll_into_view_if_needed()  # the page scrolls inside a pane
                page.screenshot(path=str(shots / "run-overview.png"), full_page=True)

                page.get_by_role("tab", name="Model metrics").click()
                page.get_by_text(f"{name} (loss)").first.wait_for()
                chart = page.locator(".js-plotly-plot").filter(has_text="Step")
                chart.first.wait_for()
                page.screenshot(path=str(shots / "run-metrics.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.stop()
    for shot in ("landing.png", "run-overview.png", "run-metrics.png"):
        assert (shots / shot).stat().st_size > 10_000, shot
    print(f"screenshots in {shots}")
