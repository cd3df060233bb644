"""Capturing attention probabilities and their gradients (the only code that touches model internals)."""
from xattn_cli.capture.recorder import AttentionEvent, AttentionRecorder, AttentionSite, Recording

__all__ = ["AttentionEvent", "AttentionRecorder", "AttentionSite", "Recording"]
