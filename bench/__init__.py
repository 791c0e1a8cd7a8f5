"""Benchmark suite: `python -m bench`."""
