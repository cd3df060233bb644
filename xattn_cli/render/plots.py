"""Figures of benchmark results, drawn with matplotlib's object API (no pyplot, so no backend or GUI)."""
from __future__ import annotations

import io

import numpy as np

from xattn_cli.render import METRIC_LABELS


def quality_figure(result: dict) -> bytes:
    """PNG of a `bench quality` result: one panel per metric (means with 95% intervals, one bar per model ×
    method), and with sanity results a panel of Spearman ρ against the number of blocks randomised."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = result["rows"]
    sanity = (result.get("sanity") or {}).get("rows") or []
    models = list(dict.fromkeys(row["model"] for row in rows))
    palette = colormaps["tab10"]
    colours = [palette(models.index(row["model"]) % 10) for row in rows]
    positions = np.arange(len(rows))
    figure = Figure(figsize=(11, 2 * (0.26 * len(rows) + 1.2)), layout="constrained")
    axes = figure.subplots(2, 3).ravel()  # five metrics, then sanity
    for panel, (axis, (metric, label)) in enumerate(zip(axes, METRIC_LABELS.items())):
        means = np.array([row[metric]["mean"] for row in rows])
        spans = np.array([[row[metric]["mean"] - row[metric]["low"], row[metric]["high"] - row[metric]["mean"]]
                          for row in rows]).T  # (2, rows)
        axis.barh(positions, means, xerr=spans, color=colours, capsize=2, error_kw={"elinewidth": 0.8})
        axis.set_title(label, fontsize=9)
        axis.set_xlim(0, 1)
        axis.set_yticks(positions, [f"{row['model']} · {row['method']}" for row in rows] if panel % 3 == 0 else [])
        axis.invert_yaxis()
        axis.tick_params(labelsize=7)
    if sanity:
        _sanity_panel(axes[-1], sanity, result["sanity"]["flag_at"])
    else:
        axes[-1].set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _sanity_panel(axis, rows: list[dict], flag_at: float) -> None:
    """Spearman ρ against the number of blocks randomised: a colour per method, a line style per model."""
    from matplotlib import colormaps

    methods = list(dict.fromkeys(row["method"] for row in rows))
    models = list(dict.fromkeys(row["model"] for row in rows))
    styles = ("-", "--", ":", "-.")
    for row in rows:
        steps = np.arange(1, len(row["spearman"]) + 1)
        axis.plot(steps, row["spearman"], marker=".", color=colormaps["tab10"](methods.index(row["method"]) % 10),
                  linestyle=styles[models.index(row["model"]) % len(styles)],
                  label=f"{row['model']} · {row['method']}" + (" (flagged)" if row["flagged"] else ""))
    axis.axhline(flag_at, color="grey", linewidth=0.8, linestyle=":")
    axis.set_title("sanity: Spearman ρ with trained maps", fontsize=9)
    axis.set_xlabel("blocks randomised from the top", fontsize=8)
    axis.set_ylim(-1, 1.05)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=5, loc="lower left")
