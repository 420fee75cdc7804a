"""Benchmarks of the butterfly library: run each as ``python -m benchmarks.NAME`` from the repository."""
