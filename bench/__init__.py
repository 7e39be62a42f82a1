"""Benchmarks and the prepared GPU check: commands that measure, not tests (docs/benchmarks.md).

Each module is an entry point, ``python -m bench.<name> --help``; ``bench/gpu/`` holds the GPU
check's sections and ``bench/results/`` the measurements that docs/benchmarks.md tabulates.
"""
