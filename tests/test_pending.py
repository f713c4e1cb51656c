"""The pending document (tuning.tracking.pending): what MLflow does not show yet, one entry
per kind and run, written in the order first asked for, safe across threads and processes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tuning.tracking.pending import PENDING_FILE, PendingOps


def ship(trial: str, through: int, path: str = "/r/metrics.jsonl") -> dict:
    return {"op": "ship", "trial_id": trial, "path": path, "through": through}


def test_asking_again_changes_the_waiting_entry_in_its_place(tmp_path: Path) -> None:
    pending = PendingOps(tmp_path)
    pending.add({"op": "start_trial", "trial_id": "a", "run_name": "a", "tags": {}})
    pending.add(ship("a", 10))
    pending.add({"op": "tags", "trial_id": "a", "tags": {"x": "1"}})
    pending.add(ship("b", 5))
    pending.add(ship("a", 30))
    pending.add(ship("a", 20))  # an older report arriving late never lowers the request
    pending.add({"op": "tags", "trial_id": "a", "tags": {"y": "2", "x": "3"}})
    pending.add({"op": "params", "trial_id": "a", "params": {"lr": "1"}})
    pending.add({"op": "params", "trial_id": "a", "params": {"lr": "2"}})
    pending.add({"op": "artifact", "trial_id": "a", "path": "/r/a.yaml", "artifact_path": None})
    pending.add({"op": "artifact", "trial_id": "a", "path": "/r/b.bin", "artifact_path": None})
    entries = pending.entries()
    assert [(e["op"], e.get("trial_id")) for e in entries] == [
        ("start_trial", "a"), ("ship", "a"), ("tags", "a"), ("ship", "b"), ("params", "a"),
        ("artifact", "a"), ("artifact", "a")]
    assert entries[1]["through"] == 30
    assert entries[2]["tags"] == {"x": "3", "y": "2"}
    assert entries[4]["params"] == {"lr": "1"}  # params are logged once: the first ask
    assert pending.count() == 7


def test_caller_records_merge_by_step_the_first_kept(tmp_path: Path) -> None:
    pending = PendingOps(tmp_path)
    rows = [{"step": s, "m": {"loss": 1.0}} for s in (1, 2, 3)]
    again = [{"step": s, "m": {"loss": 9.0}} for s in (3, 4)]
    pending.add({"op": "metrics", "trial_id": "a", "rows": rows, "events": []})
    pending.add({"op": "metrics", "trial_id": "a", "rows": again,
                 "events": [{"step": 4, "groups": ["lora"]}]})
    (entry,) = pending.entries()
    assert [r["step"] for r in entry["rows"]] == [1, 2, 3, 4]
    assert entry["rows"][2]["m"]["loss"] == 1.0
    assert entry["events"] == [{"step": 4, "groups": ["lora"]}]


def test_a_start_drops_the_finish_asked_for_before_it(tmp_path: Path) -> None:
    pending = PendingOps(tmp_path)
    pending.add({"op": "start_parent", "sweep_name": "s", "uid": "u1"})
    pending.add({"op": "start_trial", "trial_id": "a"})
    pending.add({"op": "finish_trial", "trial_id": "a", "status": "KILLED"})
    pending.add({"op": "finish_trial", "trial_id": "b", "status": "KILLED"})
    pending.add({"op": "kill_running"})
    pending.add({"op": "finish_parent", "status": "KILLED"})
    # the rerun: the trial a and the sweep run again; b's finish still stands
    pending.add({"op": "start_trial", "trial_id": "a"})
    pending.add({"op": "start_parent", "sweep_name": "s", "uid": "u2"})
    assert [(e["op"], e.get("trial_id")) for e in pending.entries()] == [
        ("start_parent", None), ("start_trial", "a"), ("finish_trial", "b")]
    pending.add({"op": "finish_trial", "trial_id": "a", "status": "FINISHED"})
    assert pending.entries()[-1]["op"] == "finish_trial"  # after the start, not before


def test_done_keeps_an_entry_asked_for_again_while_it_was_written(tmp_path: Path) -> None:
    pending = PendingOps(tmp_path)
    pending.add(ship("a", 10))
    (read,) = pending.entries()  # the writer takes it...
    pending.add(ship("a", 20))  # ...a report raises it meanwhile...
    pending.done(read["key"], read["seq"])  # ...so writing the old version does not remove it
    (left,) = pending.entries()
    assert left["through"] == 20
    pending.done(left["key"], left["seq"])
    assert pending.count() == 0
    pending.add(ship("a", 30))
    pending.done(read["key"], read["seq"])  # a stale seq never matches a newer entry
    assert pending.count() == 1


def test_durable_and_shared_between_instances(tmp_path: Path) -> None:
    """Two handles on one directory (a driver and a tuning.sync) from many threads at once:
    nothing asked for is lost, and a new handle reads what the others left."""
    handles = [PendingOps(tmp_path), PendingOps(tmp_path)]

    def ask(index: int) -> None:
        for n in range(40):
            handles[index % 2].add(ship(f"t{index}-{n}", n))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert PendingOps(tmp_path).count() == 160
    assert sorted(op["seq"] for op in PendingOps(tmp_path).entries()) == list(range(1, 161))


def test_changes_are_appended_and_compacted_and_read_by_another_handle(tmp_path: Path) -> None:
    driver, sync = PendingOps(tmp_path), PendingOps(tmp_path)
    driver.add(ship("a", 1))
    assert sync.entries()[0]["through"] == 1
    for step in range(2, 400):  # a long trial: its one entry changes at every report
        driver.add(ship("a", step))
        if step == 200:
            (seen,) = sync.entries()  # reads only what was appended since it last looked
            assert seen["through"] == 200
    lines = (tmp_path / PENDING_FILE).read_text().splitlines()
    assert len(lines) <= 4 * 1 + 64 + 1  # compacted, never a line per report forever
    (left,) = sync.entries()
    assert left["through"] == 399
    sync.done(left["key"], left["seq"])
    assert driver.count() == 0  # the driver sees the other handle's removal
    lines = [json.loads(line) for line in (tmp_path / PENDING_FILE).read_text().splitlines()]
    assert lines[-1] in ({"del": left["key"]}, {"seq": left["seq"]})  # appended or compacted
    driver.add(ship("b", 1))
    assert PendingOps(tmp_path).entries()[0]["seq"] > left["seq"]  # seq never runs back


def test_a_torn_last_line_is_skipped_and_the_next_change_starts_its_own(
        tmp_path: Path) -> None:
    pending = PendingOps(tmp_path)
    pending.add(ship("a", 5))
    with open(tmp_path / PENDING_FILE, "a") as fh:
        fh.write('{"set": "ship|a", "e": {"op": "sh')  # a crash mid-append
    fresh = PendingOps(tmp_path)
    assert [e["through"] for e in fresh.entries()] == [5]
    fresh.add(ship("b", 7))
    assert {e["trial_id"]: e["through"] for e in PendingOps(tmp_path).entries()} == {
        "a": 5, "b": 7}
    assert len(list(tmp_path.glob(f"{PENDING_FILE}.damaged-*"))) == 1


def test_a_rejected_operation_is_kept_for_a_human_and_no_longer_pending(tmp_path: Path) -> None:
    pending = PendingOps(tmp_path)
    pending.add({"op": "artifact", "trial_id": "a", "path": "/nope", "artifact_path": None})
    (entry,) = pending.entries()
    assert pending.note_server_error(entry["key"], entry["seq"]) == 1
    assert pending.note_server_error(entry["key"], entry["seq"]) == 2
    pending.reject(entry, ValueError("refused"))
    assert pending.count() == 0
    (line,) = pending.rejected_path.read_text().splitlines()
    kept = json.loads(line)
    assert kept["op"] == "artifact" and kept["path"] == "/nope" and "refused" in kept["error"]
