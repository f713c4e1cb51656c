"""What a sweep's trials mean, from their run directories alone: trial records, stability
verdicts, the leaderboard, advice, plots, parameter importance, the recheck plan and the
report that ties them together. Imports neither Ray nor MLflow (tests/test_package_seams.py):
a report can be rebuilt from a copied sweep directory on any machine."""
