"""Pruning: one calibration engine (calibration.py), shape surgery (surgery.py), one module per method
family (depth.py, width.py, sparse.py) and the stage that ties them to a run directory (stage.py)."""
