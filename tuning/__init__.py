"""Sweep analysis for Phase 2 differential-learning-rate tuning."""
