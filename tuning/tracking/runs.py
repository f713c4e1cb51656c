"""The writes themselves: each tracker operation applied to the MLflow store.

``SweepTracker`` decides *when* an operation is written (now, or from what is pending
later); ``RunWriter`` is *how*: find or create the experiment, the sweep's parent run and a
trial's child run (by their tags, so a lost state or a crash between a create and the state
save never makes a second one), and the nine ``_apply_*`` writers, one per operation kind.
Every writer is idempotent in sequence (watermarks drop stored steps, params and tags are
identical, starts and finishes reapplied in their order end in the same state), which is
what makes writing a pending operation again safe.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuning.tracking.errors import TrackingError, classify_error, short_reason
from tuning.tracking.names import (
    EXPERIMENT_KIND_TAG,
    TAG_FIRST_NAN_GROUP,
    TAG_FIRST_NONFINITE_STEP,
    TAG_LOGGED_THROUGH,
    TAG_NAN_EVENTS,
    TAG_PARENT_RUN_ID,
    TAG_ROLE,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_SWEEP_UID,
    TAG_TRIAL_ID,
)
from tuning.tracking.pending import ReplayReport
from tuning.tracking.records import metric_rows, nan_events_of, read_after
from tuning.tracking.state import store_section, trial_section
from tuning.tracking.values import (
    MAX_PARAMS_TAGS_PER_BATCH,
    METRICS_PER_CHUNK,
    chunks,
    group_of,
    search_quote,
)

log = logging.getLogger(__name__)

# Keys the trainer writes on every optimizer step (loss only while finite).
WATERMARK_METRICS = ("skipped", "lr/projector", "loss")


class RunWriter:
    """Applies operations to one tracking store for a ``SweepTracker`` holding its lock.

    Args:
        client: the tracker's ``MlflowClient``.
        state: the tracker's loaded state (changed in place; ``save_state`` persists it).
        store_key: the tracking URI: run ids and watermarks are kept per store.
        experiment_name / artifact_location: where runs are created.
        save_state: persists ``state`` (atomically).
        reconciled: trials whose run tags were read back in this process (shared, so the
            tracker reads each child's tags once per process, not once per operation).
    """

    def __init__(self, client: Any, state: dict[str, Any], store_key: str,
                 experiment_name: str, artifact_location: str | None,
                 save_state: Callable[[], None], reconciled: set[str]) -> None:
        self.client = client
        self._state = state
        self._store_key = store_key
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self._save_state = save_state
        self._reconciled = reconciled

    def _store(self) -> dict[str, Any]:
        return store_section(self._state, self._store_key)

    def _trial_state(self, trial_id: str) -> dict[str, Any]:
        return trial_section(self._state, self._store_key, trial_id)

    def apply(self, op: dict[str, Any], report: ReplayReport) -> None:
        """Write one operation (any error of the store propagates: the operation stays pending)."""
        kind = op.get("op")
        handler = {
            "start_parent": self._apply_start_parent,
            "start_trial": self._apply_start_trial,
            "params": self._apply_params,
            "metrics": self._apply_metrics,
            "ship": self._apply_ship,
            "final_metrics": self._apply_final_metrics,
            "tags": self._apply_tags,
            "finish_trial": self._apply_finish_trial,
            "finish_parent": self._apply_finish_parent,
            "artifact": self._apply_artifact,
            "kill_running": self._apply_kill_running,
        }.get(kind)
        if handler is None:
            raise TrackingError(f"unknown tracker operation {kind!r}")
        handler(op, report)

    def _ensure_experiment(self) -> str:
        store = self._store()
        if store.get("experiment_id"):
            return store["experiment_id"]
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=self.artifact_location,
                    # MLflow 3's UI opens GenAI trace pages unless told this is model training.
                    tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a creation race
                    raise
                experiment_id = self.client.get_experiment_by_name(
                    self.experiment_name
                ).experiment_id
        elif experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment_name!r} is deleted; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        else:
            experiment_id = experiment.experiment_id
        store["experiment_id"] = experiment_id
        self._save_state()
        return experiment_id

    def _find_run(self, experiment_id: str, tags: Mapping[str, str],
                  newest: bool | None = None) -> Any | None:
        """The first run of the experiment that carries every one of ``tags`` (None: none).
        ``newest``: True, the latest started first; False, the earliest; None, in the
        store's own order (for tags that only one run carries)."""
        found = self.client.search_runs(
            [experiment_id],
            " AND ".join(f"tags.`{key}` = '{search_quote(value)}'" for key, value in tags.items()),
            max_results=1,
            order_by=None if newest is None else [
                f"attributes.start_time {'DESC' if newest else 'ASC'}"],
        )
        return found[0] if found else None

    def _ensure_parent(self) -> str:
        store = self._store()
        if store.get("parent_run_id"):
            return store["parent_run_id"]
        sweep = self._state["sweep"]
        experiment_id = self._ensure_experiment()
        if sweep.get("uid") is None:
            self._recover_sweep_uid(experiment_id)
        # A crash between create_run and the state save leaves a parent we can find again.
        found = self._find_run(experiment_id, {TAG_SWEEP_UID: sweep["uid"], TAG_ROLE: "parent"})
        if found is not None:
            run_id = found.info.run_id
        else:
            run = self.client.create_run(
                experiment_id,
                run_name=sweep["name"],
                tags={
                    TAG_SWEEP: sweep["name"],
                    TAG_SWEEP_UID: sweep["uid"],
                    TAG_ROLE: "parent",
                    TAG_STATUS: "running",
                },
            )
            run_id = run.info.run_id
        store["parent_run_id"] = run_id
        self._save_state()
        return run_id

    def _recover_sweep_uid(self, experiment_id: str) -> None:
        """After the state was lost: this sweep's uid is the one on the newest parent run of
        its name in the experiment (a new uid when there is none: nothing was stored yet)."""
        sweep = self._state["sweep"]
        found = self._find_run(experiment_id, {TAG_SWEEP: sweep["name"], TAG_ROLE: "parent"},
                               newest=True)
        uid = found.data.tags.get(TAG_SWEEP_UID) if found is not None else None
        sweep["uid"] = uid or uuid.uuid4().hex
        if uid:
            print(f"[mlflow] recovered sweep {sweep['name']!r}: parent run "
                  f"{found.info.run_id} (uid {uid}) from its tags", file=sys.stderr,
                  flush=True)
        self._save_state()

    def adopt_newest_parent(self) -> None:
        """A rebuilt state used before any start_parent (tuning.sync, a pending operation of
        a killed driver): the sweep is the newest parent run of the experiment. Left unset
        when the store has none; an unreachable store raises (the operation stays pending)."""
        found = self._find_run(self._ensure_experiment(), {TAG_ROLE: "parent"}, newest=True)
        tags = found.data.tags if found is not None else {}
        if tags.get(TAG_SWEEP) and tags.get(TAG_SWEEP_UID):
            self._state["sweep"] = {"name": tags[TAG_SWEEP], "uid": tags[TAG_SWEEP_UID]}
            self._store()["parent_run_id"] = found.info.run_id
            self._save_state()

    def _reopen_if_terminated(self, run_id: str) -> None:
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _apply_start_parent(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        run_id = self._ensure_parent()
        self._reopen_if_terminated(run_id)  # a restored sweep runs again
        sweep = self._state["sweep"]
        tags = {
            **op.get("runtime_tags", {}),
            **op.get("tags", {}),
            TAG_SWEEP: sweep["name"],
            TAG_STATUS: "running",
        }
        for chunk in chunks(list(tags.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)
        for chunk in chunks(list(op.get("params", {}).items()), MAX_PARAMS_TAGS_PER_BATCH):
            try:
                self.client.log_batch(
                    run_id, params=[Param(k, v) for k, v in chunk], synchronous=True
                )
            except MlflowException as exc:
                # A restored sweep with an edited config: MLflow params are immutable. Keep the
                # originals, say so, and carry on with the sweep.
                if classify_error(exc) != "permanent":
                    raise
                log.warning("parent params not updated: %s", short_reason(exc))
        for path in op.get("artifacts", []):
            if Path(path).exists():
                self.client.log_artifact(run_id, path)
            else:
                log.warning("parent artifact %s does not exist; skipped", path)

    def _ensure_child(self, trial_id: str, create: bool) -> str | None:
        trial = self._trial_state(trial_id)
        if trial.get("run_id"):
            if trial_id not in self._reconciled:
                self._reconcile(trial_id, self.client.get_run(trial["run_id"]).data.tags,
                                trial["run_id"])
            return trial["run_id"]
        parent_id = self._ensure_parent()
        experiment_id = self._ensure_experiment()
        found = self._find_run(
            experiment_id, {TAG_TRIAL_ID: trial_id, TAG_PARENT_RUN_ID: parent_id}, newest=False)
        if found is not None:
            run_id = found.info.run_id
            self._reconcile(trial_id, found.data.tags, run_id)
        elif create:
            spec = self._state["trials"].get(trial_id, {})
            run = self.client.create_run(
                experiment_id,
                run_name=spec.get("run_name", trial_id),
                tags={
                    **spec.get("tags", {}),
                    TAG_TRIAL_ID: trial_id,
                    TAG_PARENT_RUN_ID: parent_id,
                    TAG_SWEEP: self._state["sweep"]["name"],
                    TAG_SWEEP_UID: self._state["sweep"]["uid"],
                    TAG_ROLE: "trial",
                    TAG_STATUS: "running",
                },
            )
            run_id = run.info.run_id
            self._reconciled.add(trial_id)
        else:
            return None
        trial["run_id"] = run_id
        self._save_state()
        return run_id

    def _reconcile(self, trial_id: str, tags: Mapping[str, str], run_id: str) -> None:
        """Take the max of local state, the run's own tags and the steps the store holds
        (the state may be stale or lost)."""
        trial = self._trial_state(trial_id)
        with contextlib.suppress(ValueError):
            trial["watermark"] = max(
                int(trial.get("watermark", 0)), int(tags.get(TAG_LOGGED_THROUGH, 0))
            )
        # The SQL store commits a batch's metrics and its watermark tag in separate
        # transactions: a driver killed between them leaves steps stored but not marked.
        # These keys are in (nearly) every step record: their histories say what is stored.
        for key in WATERMARK_METRICS:
            history = self.client.get_metric_history(run_id, key)
            if history:
                trial["watermark"] = max(int(trial.get("watermark", 0)),
                                         max(m.step for m in history))
        with contextlib.suppress(ValueError):
            trial["nan_events"] = max(
                int(trial.get("nan_events", 0)), int(tags.get(TAG_NAN_EVENTS, 0))
            )
        if trial.get("first_nonfinite_step") is None and TAG_FIRST_NONFINITE_STEP in tags:
            with contextlib.suppress(ValueError):
                trial["first_nonfinite_step"] = int(tags[TAG_FIRST_NONFINITE_STEP])
        # Persist now: the next ``_locked()`` re-reads the file, and a reconciled watermark
        # that lived only in memory was lost there (the resumed sweep re-logged those steps).
        self._save_state()
        self._reconciled.add(trial_id)

    def _apply_start_trial(self, op: dict[str, Any], report: ReplayReport) -> None:
        run_id = self._ensure_child(op["trial_id"], create=True)
        assert run_id is not None
        self._reopen_if_terminated(run_id)  # a retried/restored trial runs again
        self.client.set_tag(run_id, TAG_STATUS, "running")

    def _apply_params(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Param

        trial = self._trial_state(op["trial_id"])
        if trial.get("params_logged"):
            return
        run_id = self._ensure_child(op["trial_id"], create=True)
        for chunk in chunks(sorted(op["params"].items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
        trial["params_logged"] = True
        self._save_state()

    def _apply_ship(self, op: dict[str, Any], report: ReplayReport) -> None:
        # The watermark comes from the store's own tags and metric history first (a child
        # run seen for the first time in this process), then the file is read above it.
        trial_id = op["trial_id"]
        self._ensure_child(trial_id, create=True)
        watermark = int(self._trial_state(trial_id).get("watermark", 0))
        records, count_before = read_after(Path(op["path"]), watermark)
        records = [r for r in records if int(r["step"]) <= int(op["through"])]
        if not records:
            return
        rows = metric_rows(trial_id, records, int(op.get("ts_ms", 0)))
        events = nan_events_of(records, count_before)
        self._apply_metrics({"trial_id": trial_id, "rows": rows, "events": events}, report)

    def _apply_metrics(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Metric, RunTag

        trial_id = op["trial_id"]
        run_id = self._ensure_child(trial_id, create=True)
        trial = self._trial_state(trial_id)
        watermark = int(trial.get("watermark", 0))
        rows = [r for r in op["rows"] if r["step"] > watermark]
        events = [e for e in op.get("events", []) if e["step"] > watermark]
        report.steps_dropped += len(op["rows"]) - len(rows)
        if not rows:
            return  # events without their records: already counted with those records
        chunks: list[list[dict[str, Any]]] = [[]]
        size = 0
        for row in rows:
            if chunks[-1] and size + len(row["m"]) > METRICS_PER_CHUNK:
                chunks.append([])
                size = 0
            chunks[-1].append(row)
            size += len(row["m"])
        low = watermark
        for number, chunk in enumerate(chunks):
            high = chunk[-1]["step"]
            last = number == len(chunks) - 1
            chunk_events = [e for e in events if low < e["step"] and (e["step"] <= high or last)]
            tags = {TAG_LOGGED_THROUGH: str(high)}
            bad_steps = {r["step"]: r["bad"] for r in chunk if r["bad"]}
            event_steps = {e["step"]: e for e in chunk_events}
            nonfinite_steps = sorted(set(bad_steps) | set(event_steps))
            nan_events = int(trial.get("nan_events", 0)) + len(nonfinite_steps)
            first_step = trial.get("first_nonfinite_step")
            first_group = None
            if nonfinite_steps:
                tags[TAG_NAN_EVENTS] = str(nan_events)
                if first_step is None:
                    first_step = nonfinite_steps[0]
                    event = event_steps.get(first_step)
                    if event is not None and event["groups"]:
                        first_group = ",".join(event["groups"])
                    elif event is not None and event["where"]:
                        first_group = event["where"]
                    else:
                        first_group = ",".join(
                            sorted({group_of(k) for k in bad_steps[first_step]})
                        )
                    tags[TAG_FIRST_NONFINITE_STEP] = str(first_step)
                    tags[TAG_FIRST_NAN_GROUP] = first_group
            metrics = [
                Metric(key, value, row["ts"], row["step"])
                for row in chunk
                for key, value in row["m"].items()
            ]
            self.client.log_batch(
                run_id,
                metrics=metrics,
                tags=[RunTag(k, v) for k, v in tags.items()],
                synchronous=True,
            )
            trial["watermark"] = high
            trial["nan_events"] = nan_events
            trial["first_nonfinite_step"] = first_step
            self._save_state()  # persisted per successful batch: the exactly-once guarantee
            report.steps_logged += len(chunk)
            low = high

    def _apply_final_metrics(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Metric

        run_id = self._ensure_child(op["trial_id"], create=True)
        # A replayed operation logs the same values again at the same step: the latest value,
        # which every chart shows, does not change.
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, op["ts_ms"], op["step"])
                     for k, v in sorted(op["metrics"].items())],
            synchronous=True,
        )

    def _apply_tags(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import RunTag

        if op.get("trial_id") is None:
            run_id = self._ensure_parent()
        else:
            run_id = self._ensure_child(op["trial_id"], create=True)
        for chunk in chunks(sorted(op["tags"].items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)

    def _apply_finish_trial(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import RunTag

        run_id = self._ensure_child(op["trial_id"], create=False)
        if run_id is None:
            return  # never started in this store: nothing to finish
        tags = {**op.get("tags", {}), TAG_STATUS: op["status"].lower()}
        self.client.log_batch(
            run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())], synchronous=True
        )
        self.client.set_terminated(run_id, op["status"], end_time=op.get("end_ms"))
        self._trial_state(op["trial_id"])["status"] = op["status"]
        self._save_state()

    def _apply_finish_parent(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import RunTag

        run_id = self._ensure_parent()
        tags = {**op.get("tags", {}), TAG_STATUS: op["status"].lower()}
        self.client.log_batch(
            run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())], synchronous=True
        )
        self.client.set_terminated(run_id, op["status"], end_time=op.get("end_ms"))

    def _apply_artifact(self, op: dict[str, Any], report: ReplayReport) -> None:
        path = Path(op["path"])
        if not path.exists():
            raise TrackingError(f"artifact {path} no longer exists")
        if op.get("trial_id") is None:
            run_id = self._ensure_parent()
        else:
            run_id = self._ensure_child(op["trial_id"], create=True)
        self.client.log_artifact(run_id, str(path), op.get("artifact_path"))

    def _apply_kill_running(self, op: dict[str, Any], report: ReplayReport) -> None:
        parent_id = self._ensure_parent()
        experiment_id = self._ensure_experiment()
        page_token = None
        while True:
            runs = self.client.search_runs(
                [experiment_id],
                f"tags.`{TAG_PARENT_RUN_ID}` = '{search_quote(parent_id)}' "
                "AND attributes.status = 'RUNNING'",
                max_results=500,
                page_token=page_token,
            )
            for run in runs:
                self.client.set_tag(run.info.run_id, TAG_STATUS, "killed")
                self.client.set_terminated(run.info.run_id, "KILLED", end_time=op.get("end_ms"))
            page_token = runs.token
            if not page_token:
                break
        if self.client.get_run(parent_id).info.status == "RUNNING":
            self.client.set_tag(parent_id, TAG_STATUS, "killed")
            self.client.set_terminated(parent_id, "KILLED", end_time=op.get("end_ms"))

