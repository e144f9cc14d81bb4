"""Benchmarks, run from a source checkout (``python -m bench.ops``, ``python -m bench.e2e``, ``python -m bench.accuracy``); not installed with the package."""
