"""Benchmarks (installed as ``noprop.bench``)."""
