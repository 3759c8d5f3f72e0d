"""Datasets: the built-in shapes world, corpus readers and writers."""
