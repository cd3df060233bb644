"""Measuring explanations: faithfulness metrics, `xattn bench quality` and `bench perf`. Drives explainers
and models like any caller; `train/` reuses its metrics so that model cards and benchmarks agree.

The names here import nothing heavy, so the CLI can show them in its help without loading torch.
"""
HELD_OUT_SEED = 40_000  # the held-out shapes stream: no training run or benchmark script draws from it
DEFAULT_SCENES = 100  # every bundled model × method + baselines in about 8 minutes on one shared core (quality.md)
DEFAULT_SANITY_SCENES = 12
BASELINES = ("random", "centre")
PERTURBATIONS = ("pixels", "attention")  # `bench quality --perturb`: black out patches, or mask attention keys
