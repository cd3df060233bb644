"""Measuring explanations: faithfulness metrics and the `xattn bench quality` run."""
