"""Assert on what the CI smoke sweep wrote: trials finished, metrics present, leaderboard."""

import json
import sqlite3
import sys
from pathlib import Path

sweep = Path(sys.argv[1])
index = json.loads((sweep / "trials.json").read_text())
assert len(index) == 2 and all(v["status"] == "TERMINATED" for v in index.values()), index
for trial in index:
    run = sweep / "trials" / trial
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 12, summary
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), steps
    assert (run / "trainable.safetensors").is_file()
board = (sweep / "report" / "leaderboard.csv").read_text().splitlines()
assert len(board) == 3, board  # header + 2 trials
assert (sweep / "report" / "best_stable.yaml").is_file()
con = sqlite3.connect(sweep / "mlflow" / "mlflow.db")
runs = con.execute("select status from runs").fetchall()
assert len(runs) == 3 and all(s == "FINISHED" for (s,) in runs), runs
steps = con.execute("select count(*) from metrics where key = 'loss'").fetchone()[0]
assert steps == 24, steps
print(f"smoke sweep OK: {len(index)} trials x 12 steps, leaderboard and MLflow complete")
