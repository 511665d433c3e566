"""The benchmarks directory is a pytest-benchmark suite: ``pytest benchmarks --benchmark-only``.

It is outside the default test run (``testpaths = ["tests"]`` in pyproject.toml).
"""
