"""What a failed MLflow call means for the sweep: the tracker's error classes, how a failure
is classified (an outage to retry, a server error to retry a few times, a refusal to reject),
its one-line reason for humans, and the bound on every HTTP wait."""

from __future__ import annotations

import os
import socket
from typing import Literal

_RETRYABLE_MLFLOW_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
    }
)


class TrackingError(RuntimeError):
    """The tracker was used wrongly, or the store refused something for good."""


class TrackingUnavailable(TrackingError):
    """The tracking server/store cannot be reached."""


def bound_http_waits(timeout_s: float) -> None:
    """Bound every MLflow HTTP call of this process to roughly ``timeout_s`` seconds in total.

    One attempt waits at most ``timeout_s / 2`` for connect and for each read, with one quick
    retry (urllib3 sleeps 0 s before a first retry), so a dead or silent server costs one write
    about ``timeout_s``; the operation then stays pending. MLflow's defaults (120 s, 7 retries with
    exponential backoff) would freeze the Ray driver loop for minutes.
    """
    per_attempt = max(1, int(timeout_s // 2))  # the variable is parsed as int
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(per_attempt)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"  # int-typed in mlflow
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"



def _error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def classify_error(exc: BaseException) -> Literal["outage", "server", "permanent"]:
    """How a failed MLflow call should be treated.

    outage: no answer (refused, reset, timeout, DNS, SQLite locked/unopenable) -> stays
        pending, retried.
    server: the server answered with a retryable error (5xx, rate limit) -> stays pending,
        retried a few times, then rejected.
    permanent: the store refused the request itself (bad value, deleted run) -> reject, log.
    """
    import requests
    import urllib3

    outage_types: tuple[type[BaseException], ...] = (
        requests.exceptions.RequestException,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
    )
    try:  # SQLite "database is locked" / "unable to open database file"
        from sqlalchemy.exc import OperationalError

        outage_types += (OperationalError,)
    except ImportError:  # pragma: no cover - mlflow-skinny has no SQLAlchemy
        pass

    chain = _error_chain(exc)
    if any(isinstance(e, outage_types) for e in chain):
        return "outage"
    from mlflow.exceptions import MlflowException

    for e in chain:
        if isinstance(e, MlflowException) and e.error_code in _RETRYABLE_MLFLOW_CODES:
            return "server"
    return "permanent"


def short_reason(exc: BaseException) -> str:
    """One human line for an MLflow/requests failure (the raw text is a screenful)."""
    chain = _error_chain(exc)
    text = " | ".join(str(e) for e in chain)
    if "Connection refused" in text or any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    import requests

    if any(isinstance(e, requests.exceptions.Timeout | TimeoutError) for e in chain) or (
        "timed out" in text.lower() or "timeout" in text.lower()
    ):
        return "no answer before the timeout"
    if any(isinstance(e, socket.gaierror) for e in chain) or "Name or service not known" in text:
        return "host name does not resolve"
    first = str(exc).strip().splitlines()
    line = first[0] if first else type(exc).__name__
    return f"{type(exc).__name__}: {line}"[:300]

