"""Capturing attention probabilities and their gradients, and choosing where gradients start: the only
code that touches model internals (hooks, attention-function swaps). Imports `tensors` only of ours."""
from xattn_cli.capture.recorder import AttentionEvent, AttentionRecorder, AttentionSite, Recording

__all__ = ["AttentionEvent", "AttentionRecorder", "AttentionSite", "Recording"]
