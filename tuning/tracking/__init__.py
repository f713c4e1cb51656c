"""MLflow: the sweep's parent run and one child per trial (tracker, with runs, state,
pending, store, records, values, names, errors, provenance beside it), the background writer
that keeps Tune's hooks from waiting on MLflow (writer), the Ray Tune callback that feeds it
(callback), and the driver's MLflow work around the Ray run (publish). Step records reach
MLflow from each trial's metrics.jsonl. The only part of tuning/ besides sync.py that
imports MLflow."""
