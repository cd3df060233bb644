"""Rendering of relevance maps: heatmap overlays for people to look at."""

METRIC_LABELS = {"pointing": "pointing ↑", "miou": "mIoU ↑", "energy": "energy ↑", "auc_positive": "AUC+ ↓",
                 "auc_negative": "AUC− ↑"}
"""How tables, plots and reports name each faithfulness metric (and which way is better)."""
