"""SweepTracker against a real ``mlflow server`` over HTTP (127.0.0.1 only).

A sweep is logged through the REST API; the server is stopped mid-way (writes must spool to the
pending quickly and training must not wait), restarted, and ``python -m tuning.sync`` writes
what is pending. Reachability checks must fail fast against a closed port and stay bounded against
a socket that accepts but never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing, suppress
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient

from tuning.tracking.errors import TrackingUnavailable
from tuning.tracking.pending import PENDING_FILE
from tuning.tracking.tracker import SweepTracker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 120.0  # cold start is ~10 s on a 2-core machine; CI may be busier


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` as a subprocess in its own process group (it forks uvicorn and a job
    runner, so stopping must signal the whole group, not just the CLI's pid)."""

    def __init__(self, port: int, backend_uri: str, artifacts: Path, log_path: Path) -> None:
        self.port = port
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                self.backend_uri,
                "--artifacts-destination",
                str(self.artifacts),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    healthy = response.status == 200
                # /health answers before the store is open: the first API call opens it
                # (and may take seconds under load), so the tests' short probes only ever
                # meet a server that is ready, as a sweep meets a long-running one.
                if healthy:
                    search = urllib.request.Request(
                        f"{self.url}/api/2.0/mlflow/experiments/search",
                        data=b'{"max_results": 1}', method="POST",
                        headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(search, timeout=30) as response:
                        if response.status == 200:
                            return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server not healthy in {SERVER_START_TIMEOUT_S}s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        with_group = self.proc.pid  # start_new_session: the group id is the child's pid
        with suppress(ProcessLookupError):
            os.killpg(with_group, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # uvicorn's worker may outlive the CLI by a moment; make sure the port is free again
        with suppress(ProcessLookupError):
            os.killpg(with_group, signal.SIGKILL)
        self.proc = None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def record(step: int) -> dict[str, float | int | None]:
    return {
        "step": step,
        "epoch": 0,
        "loss": 2.0 / (1 + 0.02 * step),
        "grad_norm": 1.0,
        "grad_norm/projector": 0.7,
        "grad_norm/lora": 0.3,
        "lr/projector": 5e-4,
        "lr/lora": 5e-5,
        "clipped": 0,
        "skipped": 0,
        "nan_events": 0,
        "samples_per_s": 10.0,
        "tokens_per_s": 640.0,
    }


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def test_sweep_over_http_survives_server_outage(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.resolved.yaml"
    config.write_text("learning_rate: 0.0001\n")
    server = MlflowServer(
        free_port(),
        f"sqlite:///{tmp_path / 'server.db'}",
        tmp_path / "server-artifacts",
        tmp_path / "server.log",
    )
    try:
        server.start()
        tracker = SweepTracker(server.url, "http-sweep", state, timeout_s=4.0)
        tracker.check_reachable()
        parent = tracker.start_parent("http", {"num_samples": 2}, [config], {"owner": "ci"})
        assert parent
        for trial in ("t0", "t1"):
            assert tracker.start_trial(trial, f"trial_{trial}")
            tracker.log_params(trial, {"learning_rate": 1e-4, "gradient_clip_val": None})
            for low in range(1, 51, 10):
                tracker.log_records(trial, [record(s) for s in range(low, low + 10)])
        # On a loaded machine a write may outlast its read timeout while the server is still
        # up, and it stays pending with everything after it. Write that first, so the outage
        # below starts with nothing pending and its count is the outage's alone.
        deadline = time.monotonic() + 60
        while tracker.pending_operations() and time.monotonic() < deadline:
            tracker.catch_up(force=True)
        assert tracker.pending_operations() == 0
        client = MlflowClient(server.url)
        assert loss_steps(client, tracker.run_id_of("t0")) == list(range(1, 51))
        assert loss_steps(client, tracker.run_id_of("t1")) == list(range(1, 51))

        server.stop()  # the outage
        started = time.monotonic()
        for trial in ("t0", "t1"):
            tracker.log_records(trial, [record(s) for s in range(41, 101)])  # overlaps 41..50
            tracker.log_artifact(trial, config)
            tracker.finish_trial(trial, "FINISHED", {"end_reason": "completed"})
        tracker.finish_parent("FINISHED")
        assert time.monotonic() - started < 15, "writes during an outage must not block"
        assert tracker.pending_operations() == 7
        assert (state / PENDING_FILE).is_file()
        with pytest.raises(TrackingUnavailable):
            tracker.check_reachable()

        server.start()  # same port, same database
        sync = subprocess.run(
            [sys.executable, "-m", "tuning.sync", str(state)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert sync.returncode == 0, sync.stdout + sync.stderr
        assert "wrote 7 pending operation(s)" in sync.stdout
        assert tracker.pending_operations() == 0

        experiment_id = client.get_experiment_by_name("http-sweep").experiment_id
        runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED"
            assert loss_steps(client, run.info.run_id) == list(range(1, 101))
            assert run.data.params == {"learning_rate": "0.0001", "gradient_clip_val": "none"}
            assert [a.path for a in client.list_artifacts(run.info.run_id)] == [
                "config.resolved.yaml"
            ]
        assert client.get_run(parent).info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(parent)] == ["config.resolved.yaml"]
    finally:
        server.stop()


def test_check_reachable_fails_fast_on_closed_port(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = SweepTracker(uri, "closed", tmp_path / "state")
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        tracker.check_reachable()
    assert time.monotonic() - started < 10
    assert str(info.value) == (
        f"MLflow tracking server {uri} unreachable: connection refused; "
        "start it or set mlflow.on_unreachable: continue"
    )


def test_silent_server_is_bounded(tmp_path: Path) -> None:
    """A socket that accepts connections (kernel backlog) but never answers: the probe gives up
    in under 10 s, and a write costs about timeout_s before it is left pending."""
    with closing(socket.socket()) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        tracker = SweepTracker(uri, "silent", tmp_path / "state", timeout_s=4.0)
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable) as info:
            tracker.check_reachable()
        assert time.monotonic() - started < 10
        assert "no answer before the timeout" in str(info.value)

        started = time.monotonic()
        assert tracker.start_parent("silent", {}) is None
        tracker.start_trial("t0")
        tracker.log_records("t0", [record(1)])
        assert time.monotonic() - started < 10  # one bounded wait, then backoff, pending
        assert tracker.pending_operations() == 3
