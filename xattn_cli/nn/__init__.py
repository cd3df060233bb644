"""Attention modules for models built in this project (the co-attention reference tests, causal attention)
that expose their probabilities to the recorder. Imports torch and errors only."""
from xattn_cli.nn.causal_attention import CausalAttention
from xattn_cli.nn.cross_attention import CrossAttention

__all__ = ["CausalAttention", "CrossAttention"]
