"""Recipes that build real-weights checkpoint folders from locally available sources (for tests and benchmarks)."""
