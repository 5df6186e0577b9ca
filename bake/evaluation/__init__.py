"""Measuring a steering's effect against its cost: metrics and scorers, the evaluator, calibration (coefficient: auto),
sweeps and plots."""
