"""Explainers: a loaded adapter + a method + targets → maps for batches of PIL images."""
