"""Benchmarks: one harness (harness.py), one file per suite. `python -m bench` is the main job."""
