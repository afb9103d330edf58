"""Benchmarks that run on a worker's machine (``kleinfarm bench kv``)."""
