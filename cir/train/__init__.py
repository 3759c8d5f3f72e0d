"""Composer training on Ray Train: triplet sources, the worker loop, stage chaining."""
