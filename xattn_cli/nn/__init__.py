"""Reusable attention modules that expose their probabilities to the recorder."""
from xattn_cli.nn.cross_attention import CrossAttention

__all__ = ["CrossAttention"]
