"""Benchmarks: attention kernels (`attention.py`), end to end (`e2e.py`), editing (`edit.py`)."""
