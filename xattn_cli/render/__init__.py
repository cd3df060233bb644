"""Rendering for people: heatmap overlays, benchmark plots, the HTML report. Imports errors, io and results;
never eval, explainers or models (benchmark tables hand it plain dicts)."""

METRIC_LABELS = {"pointing": "pointing ↑", "miou": "mIoU ↑", "energy": "energy ↑", "auc_positive": "AUC+ ↓",
                 "auc_negative": "AUC− ↑"}
"""How tables, plots and reports name each faithfulness metric (and which way is better)."""
