"""Ray Tune: the sweep's driver (Ray start, the Tuner, interrupts), the trainable each
trial runs, the shared-group actor, the re-check stage, the search space, the live progress
table, checkpoint pruning and disk-full handling. The only part of tuning/ that imports
Ray."""
