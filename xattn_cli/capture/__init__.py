"""Capturing attention probabilities and their gradients, and choosing where gradients start: the only
code that touches model internals (hooks, attention-function swaps). Imports `tensors` and `nn` (Ψ) only of ours."""
from xattn_cli.capture.masking import TokenMask
from xattn_cli.capture.recorder import AttentionEvent, AttentionRecorder, AttentionSite, Recording

__all__ = ["AttentionEvent", "AttentionRecorder", "AttentionSite", "Recording", "TokenMask"]
