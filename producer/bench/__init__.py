"""Benchmarks that print their figures as JSON (``kleinfarm bench``), and the routing simulator."""
