"""Owns evaluation: `python -m train eval` (evaluate.py), metrics (metrics.py) and charts (charts.py)."""
