"""Benchmark: the embedded zoo of real-image tasks and the merging comparison."""
