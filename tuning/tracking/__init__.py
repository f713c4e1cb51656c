"""MLflow: the sweep's parent run and one child per trial (tracker), the durable writer
that ships step records to MLflow and survives outages (writer), the Ray Tune callback
that feeds it (callback). The only part of tuning/ besides sync.py that imports MLflow."""
