"""Sweeps: which experiments a study runs (designs.py, plan.py) and running them (runner.py)."""
