"""Benchmarks and measurement scripts; run each as `PYTHONPATH=. python bench/SCRIPT.py --help`.

Scripts that write documentation write only generated files under docs/generated/ (never edited
by hand); the prose about them is in docs/ (benchmark.md) and docs/lab/ (lab notes). Helpers
they share (memory readings, fresh-process points, tables) are in `bench.common`.
"""
