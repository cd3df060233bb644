"""Rendering for people: heatmap overlays, benchmark plots, the HTML report. Imports errors, io and results;
never eval, explainers or models (benchmark tables hand it plain dicts)."""
import base64
import html

METRIC_LABELS = {"pointing": "pointing ↑", "miou": "mIoU ↑", "energy": "energy ↑", "auc_positive": "AUC+ ↓",
                 "auc_negative": "AUC− ↑"}
"""How tables, plots and reports name each faithfulness metric (and which way is better)."""


def escape(text: object) -> str:
    """`text` as HTML text or attribute value (quotes escaped too)."""
    return html.escape(str(text), quote=True)


def png_data_uri(data: bytes) -> str:
    """PNG bytes as a data URI, so a page embeds the picture and references nothing outside itself."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
