"""Micro-benchmarks of the per-request pure code: ``python -m bench.micro``."""
