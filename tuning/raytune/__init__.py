"""Ray Tune: the trainable each trial runs, the shared-group actor, the search space, the
live progress table, checkpoint pruning and disk-full handling. The only part of tuning/
besides sweep.py that imports Ray."""
