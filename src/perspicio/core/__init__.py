"""Mechanisms shared by every method: targets, capture, guard, batching, results, registries."""
