"""Benchmarks: each writes JSON and updates docs/benchmarks.md."""
