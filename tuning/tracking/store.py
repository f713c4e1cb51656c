"""Opening a tracking store: the embedded SQLite file created whole or not at all, where a
store keeps artifacts, and the quick probe that says before a sweep starts whether the store
can be used."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuning.tracking.errors import TrackingUnavailable, short_reason


def artifact_location(tracking_uri: str, state_dir: Path) -> str | None:
    """Local stores keep artifacts beside the state; a server picks its own location."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return (state_dir / "mlartifacts").as_uri()


def create_embedded_store(db: Path, artifacts: str | None) -> None:
    """Create the embedded SQLite schema in a side file, then link it into place as ``db``.

    MLflow migrates a new SQLite file in many steps; a driver killed in between leaves a
    half-migrated ``mlflow.db`` that every later open refuses ("table _alembic_tmp_...
    already exists"). ``os.link`` publishes the finished file only if none exists yet, so
    two processes racing here both end up on one complete store.
    """
    if db.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    side = db.with_name(f".mlflow.db.init-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        store = SqlAlchemyStore(f"sqlite:///{side}", artifacts)
        store.engine.dispose()
        with contextlib.suppress(FileExistsError):  # another process was first: use its
            os.link(side, db)
    finally:
        side.unlink(missing_ok=True)


def check_reachable(tracking_uri: str, timeout_s: float, client: Callable[[], Any]) -> None:
    """Fail in well under 10 s with ``TrackingUnavailable`` when the store cannot be used.

    A server gets one HTTP probe without MLflow's retries; any other store is opened through
    ``client()`` and asked for one experiment.
    """
    if tracking_uri.startswith(("http://", "https://")):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        probe_timeout = max(1.0, min(timeout_s / 2, 5.0))
        try:
            response = http_request(
                get_default_host_creds(tracking_uri),
                "/api/2.0/mlflow/experiments/search",
                "POST",
                max_retries=0,
                backoff_factor=0,
                backoff_jitter=0,
                timeout=probe_timeout,
                raise_on_status=False,
                json={"max_results": 1},
            )
        except Exception as exc:
            raise TrackingUnavailable(_unreachable_text(tracking_uri, short_reason(exc))) \
                from exc
        if response.status_code != 200:
            reason = f"HTTP {response.status_code} {response.text.strip()[:200]}"
            raise TrackingUnavailable(_unreachable_text(tracking_uri, reason))
        return
    try:
        client().search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnavailable(
            f"MLflow tracking store {tracking_uri} unusable: {short_reason(exc)}"
        ) from exc


def _unreachable_text(tracking_uri: str, reason: str) -> str:
    return (
        f"MLflow tracking server {tracking_uri} unreachable: {reason}; "
        "start it or set mlflow.on_unreachable: continue"
    )
