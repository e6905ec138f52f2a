"""Benchmarks: each module is one command (`python -m bench.<name>`) that starts its own
processes on loopback, measures, and prints a table. See docs/benchmarks.md."""
