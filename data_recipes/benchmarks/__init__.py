"""Benchmark releases -> the question files `python -m llava_lightning evaluate` reads (README.md)."""
