"""Benchmark scripts (run as ``python bench/NAME.py``); ``bench.common`` holds what they share."""
