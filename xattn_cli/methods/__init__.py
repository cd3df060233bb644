"""Explanation methods: pure functions of tensors (no I/O, no model-family knowledge)."""
