"""Benchmarks: scripts that print a table and write it as JSON and markdown (never timed tests)."""
