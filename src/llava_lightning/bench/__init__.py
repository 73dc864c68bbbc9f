"""Benchmarks behind `make bench`: each prints our figure, the named baseline's, and their ratio."""
