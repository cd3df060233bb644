"""Measuring explanations: faithfulness metrics and the `xattn bench quality` run.

The names here import nothing heavy, so the CLI can show them in its help without loading torch.
"""
HELD_OUT_SEED = 40_000  # the held-out shapes stream: no training run or benchmark script draws from it
DEFAULT_SCENES = 100  # all bundled models × methods + baselines in about 4 minutes on 2 CPU cores
DEFAULT_SANITY_SCENES = 12
BASELINES = ("random", "centre")
