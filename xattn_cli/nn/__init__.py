"""Attention modules for models built in this project (the co-attention reference tests, and the causal
attention to come) that expose their probabilities to the recorder. Imports torch only."""
from xattn_cli.nn.cross_attention import CrossAttention

__all__ = ["CrossAttention"]
