"""Render the figure tables of the model cards, benchmarks/mask.md and catt.md from the benchmark JSON; the
prose stays hand-written.

    python benchmarks/cards.py           # rewrite the tables of every card in place
    python benchmarks/cards.py --check   # exit 1, naming the cards, where a table differs from its JSON

A card marks each generated table with `<!-- figures:NAME -->` … `<!-- /figures:NAME -->`; this file says,
per card and NAME, which JSON (written by the benchmark's `--json`) and which rows. A figure with a target
is the card's headline: bold, with the target, and "not met" when it is below.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
MARKED = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<table>.*?)(<!-- /figures:(?P=name) -->)", re.DOTALL)


@dataclass(frozen=True)
class Row:
    label: str
    keys: tuple[str, ...]  # one figure, or several shown as "a / b / c"
    target: float | None = None  # headline: bold, "(target ≥ T)", "not met" below it
    at_most: tuple[str, str] | None = None  # (claim, key): this figure should not exceed that one's
    bold: bool = False  # a headline without a target

    def render(self, figures: dict[str, float]) -> str:
        values = [figures[key] for key in self.keys]
        text = " / ".join(f"{value:.3f}" for value in values)
        notes = []
        if self.target is not None:
            notes.append(f"target ≥ {self.target:.2f}" + ("" if values[0] >= self.target else ": **not met**"))
        if self.at_most is not None and values[0] > figures[self.at_most[1]]:
            notes.append(f"{self.at_most[0]}: **not met**")
        if notes or self.bold:
            text = f"**{text}**" + (f" ({'; '.join(notes)})" if notes else "")
        return f"| {self.label} | {text} |"


def row(label: str, *keys: str, target: float | None = None, at_most: tuple[str, str] | None = None,
        bold: bool = False) -> Row:
    return Row(label, keys, target, at_most, bold)


def figure_table(rows: list[Row]) -> Callable[[dict], str]:
    def render(figures: dict[str, float]) -> str:
        return "\n".join(["| figure | value |", "| --- | --- |", *(r.render(figures) for r in rows)]) + "\n"
    return render


def _vqa_rows(model: str, chefer: str, raw: str, gradcam: str) -> list[Row]:
    def key(figure: str) -> str:
        return f"{model} {figure}"

    return [
        row("held-out answer accuracy (500 scenes of stream 12000, 2,675 questions)", key("accuracy"), target=0.85),
        row("colour / shape / yes-no questions", key("accuracy_colour"), key("accuracy_shape"), key("accuracy_yes_no")),
        row(f"pointing game, Chefer relevancy ({chefer})", key("pointing chefer"), target=0.80),
        row(f"pointing game, raw attention ({raw})", key("pointing raw"),
            at_most=("Chefer ≥ raw", key("pointing chefer"))),
        row(f"pointing game, attention Grad-CAM ({gradcam})", key("pointing attn-gradcam")),
        row("the same three over the questions the model answered right: Chefer / raw / attention Grad-CAM",
            key("pointing chefer, answered right"), key("pointing raw, answered right"),
            key("pointing attn-gradcam, answered right")),
    ]


def _interval(figure: dict[str, float], target: float | None = None) -> str:
    """`mean [low, high]`; with a target, bold with "(target ≥ T)" and "not met" when the mean is below."""
    text = f"{figure['mean']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"
    if target is None:
        return text
    return f"**{text}** (target ≥ {target:.2f}" + ("" if figure["mean"] >= target else ": **not met**") + ")"


def mask_table(model: str, rows: list[tuple[str, str, float | None]], decided: str,
               gain: tuple[str, str, float | None]) -> Callable[[dict], str]:
    """benchmarks/mask.md: per (label, figure, target on the mask) the learned mask beside Chefer's top 25 %,
    then a sufficiency gain over Chefer (figure, over which targets, target), MEAT's threshold-rule fraction,
    the run's size and cost."""
    def render(result: dict) -> str:
        figures = result["models"][model]
        lines = ["| figure | learned mask | Chefer top 25 % |", "| --- | --- | --- |"]
        for label, key, target in rows:
            lines.append(f"| {label} | {_interval(figures['mask'][key], target)} | "
                         f"{_interval(figures['chefer'][key])} |")
        gain_key, population, gain_target = gain
        lines += [f"| sufficiency gain over Chefer, paired over {population} | "
                  f"{_interval(figures[gain_key], gain_target)} | |",
                  f"| kept fraction under MEAT's rule (margin > 0) | {_interval(figures['kept_threshold'])} | |",
                  "",
                  f"{result['scenes']} scenes, {figures['targets']} targets, {figures['decided']} {decided}; "
                  f"λ = {result['keep_ratio']}, {result['steps']} steps, seed {result['seed']}; "
                  f"{figures['elapsed_s']:.0f} s; the recomputed mask scores lie within "
                  f"{figures['recorded_score_difference']:.1e} of the `score_kept`/`score_removed` `xattn mask` "
                  "records."]
        return "\n".join(lines) + "\n"
    return render


def _spread(figure: dict[str, float]) -> str:
    return f"{figure['mean']:.3f} ± {figure['sd']:.3f}"


CATT_MODELS = ("shapes-catt-base", "shapes-catt")
CATT_SPLITS = ("neutral", "correlated", "anti")


def catt_accuracy(result: dict) -> str:
    """benchmarks/catt.md: mean ± sd over seeds of each model's accuracy per split and kind of answer."""
    summary = result["summary"]
    lines = ["| model | split | accuracy | colour | shape | yes/no | shortcut rate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in CATT_MODELS:
        for split in CATT_SPLITS:
            figures = summary[model][split]
            cells = [_spread(figures[key]) for key in ("accuracy", "accuracy_colour", "accuracy_shape",
                                                       "accuracy_yes_no")]
            shortcut = _spread(figures["shortcut_rate"]) if "shortcut_rate" in figures else ""
            lines.append(f"| {model} | {split} | {' | '.join(cells)} | {shortcut} |")
    gap = summary["bias_gap"]
    verdict = "shows bias" if gap["shows_bias"] else "**does not show bias**"
    lines += ["", f"Validity: the base model loses {_spread(gap)} from correlated to anti (per seed "
              f"{', '.join(f'{value:.3f}' for value in gap['values'])}; minimum {gap['minimum']:.2f}): the "
              f"experiment {verdict}. {len(result['seeds'])} seeds; questions per split: "
              + ", ".join(f"{name} {split['questions']}" for name, split in result["splits"].items())
              + f"; {result['elapsed_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def catt_seeds(result: dict) -> str:
    """benchmarks/catt.md: each seed's accuracies and the paired difference CATT − base."""
    lines = ["| seed | base neutral / correlated / anti | CATT neutral / correlated / anti |",
             "| --- | --- | --- |"]
    for seed, figures in result["seeds"].items():
        cells = [" / ".join(f"{figures[model][split]['accuracy']:.3f}" for split in CATT_SPLITS)
                 for model in CATT_MODELS]
        lines.append(f"| {seed} | {' | '.join(cells)} |")
    lines += ["", "| split | Δ = CATT − base per seed | mean ± sd | 95 % interval (questions) | effect |",
              "| --- | --- | --- | --- | --- |"]
    for split in CATT_SPLITS:
        delta = result["summary"]["delta"][split]
        values = ", ".join(f"{value:+.3f}" for value in delta["values"])
        effect = "**yes**" if delta["effect"] else "no"
        lines.append(f"| {split} | {values} | {delta['mean']:+.3f} ± {delta['sd']:.3f} | "
                     f"[{delta['low']:+.3f}, {delta['high']:+.3f}] | {effect} |")
    return "\n".join(lines) + "\n"


def catt_usage(result: dict) -> str:
    """benchmarks/catt.md: whether CATT uses its cross-sample branch, mean ± sd over seeds."""
    figures = result["summary"]["shapes-catt"]
    lines = ["| split | CATT accuracy | CS mean-ablated: accuracy; answers changed | CS zeroed: accuracy; answers "
             "changed | CS / IS in the fusion: all; varying | dictionary share of relevance |",
             "| --- | --- | --- | --- | --- | --- |"]
    for split in CATT_SPLITS:
        cell = figures[split]
        cells = [_spread(cell["accuracy"]),
                 *(f"{_spread(cell[f'accuracy_cs_{label}'])}; {_spread(cell[f'changed_cs_{label}'])}"
                   for label in ("mean_ablated", "zeroed")),
                 f"{_spread(cell['cs_to_is_norm'])}; {_spread(cell['cs_to_is_norm_varying'])}",
                 f"{cell['dictionary_share']['mean']:.2e} ± {cell['dictionary_share']['sd']:.1e}"]
        lines.append(f"| {split} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def catt_card(model: str, seed: str = "0") -> Callable[[dict], str]:
    """A bundled CATT model's card: the bundled seed's accuracies per split (catt.json), and for shapes-catt
    its cross-sample branch's usage."""
    def render(result: dict) -> str:
        figures = result["seeds"][seed][model]
        lines = ["| figure | value |", "| --- | --- |"]
        for split in CATT_SPLITS:
            kinds = " / ".join(f"{figures[split][f'accuracy_{kind}']:.3f}" for kind in ("colour", "shape", "yes_no"))
            lines.append(f"| {split} split ({result['splits'][split]['colour_rule']}): accuracy; colour / shape / "
                         f"yes-no | **{figures[split]['accuracy']:.3f}**; {kinds} |")
        lines.append(f"| anti split: shortcut rate (answers naming the confounded partner) | "
                     f"{figures['anti']['shortcut_rate']:.3f} |")
        if "dictionary_share" in figures["neutral"]:
            neutral = figures["neutral"]
            lines += [f"| neutral split, CS output mean-ablated / zeroed: accuracy; answers changed | "
                      f"{neutral['accuracy_cs_mean_ablated']:.3f} / {neutral['accuracy_cs_zeroed']:.3f}; "
                      f"{neutral['changed_cs_mean_ablated']:.3f} / {neutral['changed_cs_zeroed']:.3f} |",
                      f"| neutral split: CS half of the fusion beside the IS half (mean norm ratio; what varies "
                      f"between scenes) | {neutral['cs_to_is_norm']:.3f}; {neutral['cs_to_is_norm_varying']:.3f} |",
                      f"| neutral split: dictionary share of [CLS]'s Chefer relevance | "
                      f"{neutral['dictionary_share']:.2e} |"]
        return "\n".join(lines) + "\n"
    return render


SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")


@dataclass(frozen=True)
class Shifted:
    label: str
    key: str
    target: float | None = None
    above: tuple[str, ...] = ()  # figures this one should be at least


def shifted_table(model: str, rows: list[Shifted]) -> Callable[[dict], str]:
    """A card's figures on the style-shifted split (shifted.json): `mean [low, high]`, the issue's bar as the
    target, and "not met" where the mean is below it or below a figure it should be at least."""
    def render(result: dict) -> str:
        figures = result["models"][model]
        lines = ["| figure (style-shifted split) | mean [95 % interval] |", "| --- | --- |"]
        for shifted in rows:
            text = _interval(figures[shifted.key], shifted.target)
            below = [key for key in shifted.above if figures[shifted.key]["mean"] < figures[key]["mean"]]
            if below:
                labels = {row.key: row.label for row in rows}
                text += " (" + "; ".join(f"≥ {labels[key]}: **not met**" for key in below) + ")"
            lines.append(f"| {shifted.label} | {text} |")
        if "demo_total" in figures:
            lines.append(f"| README demo scenes answered right | {figures['demo_right']} / {figures['demo_total']} |")
        lines += ["", f"{result['scenes']} scenes per figure from stream {result['seed']} drawn in style "
                      f"`{result['style']}` (`python benchmarks/shifted.py`); {figures['elapsed_s']:.0f} s."]
        return "\n".join(lines) + "\n"
    return render


SHIFTED_ROWS = {
    "vqa": [Shifted("answer accuracy, every question", "accuracy", 0.90),
            Shifted("colour questions", "accuracy_colour"), Shifted("shape questions", "accuracy_shape"),
            Shifted("yes/no questions", "accuracy_yes_no"),
            Shifted("pointing, Chefer relevancy (peak in the asked object)", "pointing_chefer", 0.80,
                    ("pointing_raw",)),
            Shifted("pointing, raw attention", "pointing_raw", None, ("pointing_attn-gradcam",)),
            Shifted("pointing, attention Grad-CAM", "pointing_attn-gradcam")],
    "clip": [Shifted("zero-shot top-1 over the 36 captions (single objects)", "zero_shot", 0.95),
             Shifted("CLIP Surgery pointing (each object of 2–4-object scenes)", "pointing_surgery", 0.85),
             Shifted("the same on scenes where every object shares its colour or shape", "pointing_surgery_shared",
                     0.80)],
    "vit": [Shifted("per-shape accuracy (six binary decisions)", "per_shape_accuracy", 0.95),
            Shifted("pointing, Chefer relevancy", "pointing_chefer", 0.70, ("pointing_rollout", "pointing_raw")),
            Shifted("pointing, rollout", "pointing_rollout"), Shifted("pointing, raw attention", "pointing_raw"),
            Shifted("pointing, attention Grad-CAM", "pointing_attn-gradcam")],
    "detr": [Shifted("mAP@0.5 (interval over scenes)", "map50", 0.90),
             Shifted("box pointing, Chefer relevancy (peak in the detection's box)", "box_pointing_chefer", 0.95),
             Shifted("box pointing, raw attention", "box_pointing_raw"),
             Shifted("box pointing, attention Grad-CAM", "box_pointing_attn-gradcam"),
             Shifted("scenes detected exactly (each drawn shape, no more, above 0.5)", "scenes_exact"),
             Shifted("scenes with a duplicate (a shape detected more often than drawn)", "scenes_over_counted")],
}
SHIFTED_MODELS = {"shapes-lxmert": "vqa", "shapes-visualbert": "vqa", "shapes-clip": "clip", "shapes-vit": "vit",
                  "shapes-detr": "detr"}


def shifted_card(model: str) -> tuple[str, Callable[[dict], str]]:
    return "shifted.json", shifted_table(model, SHIFTED_ROWS[SHIFTED_MODELS[model]])


def shifted_summary(result: dict) -> str:
    """benchmarks/shifted.md: every model's headline figures against the bars."""
    lines = ["| model | figure | bar | mean [95 % interval] | met |", "| --- | --- | ---: | --- | --- |"]
    for model, kind in SHIFTED_MODELS.items():
        figures = result["models"].get(model)
        for shifted in SHIFTED_ROWS[kind] if figures else ():
            if shifted.target is None:
                continue
            figure = figures[shifted.key]
            met = figure["mean"] >= shifted.target
            lines.append(f"| {model} | {shifted.label} | {shifted.target:.2f} | "
                         f"{_interval(figure)} | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def clip_sweep(figures: dict) -> str:
    """The shapes-clip card's surgery sweep (`shapes_clip.py --sweep`): validation pointing per input size and
    number of v-v blocks, the best cell bold."""
    sizes = sorted({int(key.split("_size")[1].split("_")[0]) for key in figures if key.startswith("validation_")})
    blocks = sorted({int(key.rsplit("blocks", 1)[1]) for key in figures if key.startswith("validation_")})
    best = max(value for key, value in figures.items() if key.startswith("validation_"))
    lines = ["| input size | " + " | ".join(f"{count} block{'s' * (count > 1)}" for count in blocks) + " |",
             "| --- |" + " --- |" * len(blocks)]
    for size in sizes:
        values = [figures[f"validation_pointing_size{size}_blocks{count}"] for count in blocks]
        lines.append(f"| {size} | " + " | ".join(f"**{v:.3f}**" if v == best else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def grids_ceiling(result: dict) -> str:
    """benchmarks/grids.md: the token-share map's pointing and mIoU per grid."""
    lines = ["| grid (64 px) | pointing ceiling | mIoU ceiling |", "| --- | --- | --- |"]
    for grid, figures in result["ceiling"].items():
        lines.append(f"| {grid} | {figures['pointing']:.3f} | {figures['miou']:.3f} |")
    objects = next(iter(result["ceiling"].values()))["objects"]
    return "\n".join(lines) + f"\n\n{objects} objects of {result['scenes']} scenes, stream {result['seed']}, style " \
                                f"`{result['style']}`.\n"


def grids_cost(result: dict) -> str:
    """benchmarks/grids.md: seconds per training step and parameters at 8×8 and 16×16."""
    lines = ["| architecture | step at 8×8 | step at 16×16 | ratio | parameters 8×8 / 16×16 |",
             "| --- | ---: | ---: | ---: | --- |"]
    for name, grids in result["cost"].items():
        coarse, fine = grids["8x8"], grids["16x16"]
        lines.append(f"| {name} | {coarse['step_s']:.2f} s | {fine['step_s']:.2f} s | "
                     f"{fine['step_s'] / coarse['step_s']:.1f}× | {coarse['parameters']:,} / {fine['parameters']:,} |")
    return "\n".join(lines) + f"\n\nBatch {result['batch']}, one thread, median of the timed steps.\n"


CARDS: dict[str, dict[str, tuple[str, Callable[[dict], str]]]] = {
    "assets/weights/shapes-vit.md": {"shifted": shifted_card("shapes-vit"),
        "figures": ("shapes_vit.json", figure_table([
        row("per-shape accuracy (six binary decisions)", "per_shape_accuracy", target=0.90),
        row("exact-set accuracy (all six right)", "exact_set_accuracy"),
        row("pointing game, Chefer relevancy (all layers)", "pointing_chefer", bold=True),
        row("pointing game, rollout", "pointing_rollout"),
        row("pointing game, raw attention (last layer)", "pointing_raw"),
        row("pointing game, attention Grad-CAM (last layer)", "pointing_attn-gradcam"),
    ]))},
    "assets/weights/shapes-clip.md": {"shifted": shifted_card("shapes-clip"),
        "figures": ("shapes_clip.json", figure_table([
        row("zero-shot top-1 over the 36 colour×shape captions, 600 held-out single-object scenes (plain "
            "captions)", "zero_shot_plain", target=0.90),
        row("the same with the 85-template ensemble", "zero_shot_ensemble"),
        row("CLIP Surgery pointing: map peak inside the object, for each object of 300 held-out 2–4-object "
            "scenes, the scene's captions as texts", "pointing_surgery", target=0.80),
        row("plain patch–text similarity (no surgery), same scenes", "pointing_plain_similarity"),
    ])), "sweep": ("shapes_clip.json", clip_sweep)},
    "assets/models/shapes-lxmert/README.md": {"shifted": shifted_card("shapes-lxmert"),
        "figures": ("shapes_multimodal.json", figure_table(_vqa_rows(
        "shapes-lxmert", "bi-modal rules, [CLS] row of R^ti", "last text→vision cross attention, [CLS] row",
        "the same attention, gradient-weighted heads")))},
    "assets/models/shapes-visualbert/README.md": {"shifted": shifted_card("shapes-visualbert"),
        "figures": ("shapes_multimodal.json", figure_table(_vqa_rows(
        "shapes-visualbert", "all layers, read at the pooled token", "last layer, pooled row", "last layer")))},
    "assets/models/shapes-detr/README.md": {"shifted": shifted_card("shapes-detr"),
        "figures": ("shapes_multimodal.json", figure_table([
        row("held-out mAP@0.5 (500 scenes of stream 13000; every query a detection scored by its best class)",
            "shapes-detr map50", target=0.70),
        row("AP@0.5 " + " / ".join(SHAPES), *(f"shapes-detr ap50_{shape}" for shape in SHAPES)),
        row("per-detection pointing, Chefer relevancy (encoder-decoder rules, R^qi of the query)",
            "shapes-detr pointing chefer", target=0.90),
        row("per-detection pointing, raw attention (last decoder cross attention, the query's row)",
            "shapes-detr pointing raw", at_most=("Chefer ≥ raw", "shapes-detr pointing chefer")),
        row("per-detection pointing, attention Grad-CAM (the same attention, gradient-weighted heads)",
            "shapes-detr pointing attn-gradcam"),
    ]))},
    "benchmarks/shifted.md": {"summary": ("shifted.json", shifted_summary)},
    "benchmarks/grids.md": {"ceiling": ("grids.json", grids_ceiling), "cost": ("grids.json", grids_cost)},
    "assets/models/shapes-catt/README.md": {"figures": ("catt.json", catt_card("shapes-catt"))},
    "assets/models/shapes-catt-base/README.md": {"figures": ("catt.json", catt_card("shapes-catt-base"))},
    "benchmarks/catt.md": {"accuracy": ("catt.json", catt_accuracy), "seeds": ("catt.json", catt_seeds),
                           "usage": ("catt.json", catt_usage)},
    "benchmarks/mask.md": {
        "shapes-vit": ("mask.json", mask_table("shapes-vit", [
            ("sufficiency: the kept patches alone keep the logit > 0", "sufficiency", 0.95),
            ("complement: with the kept patches removed the logit is ≤ 0", "complement", 0.85),
            ("sufficiency over every target present", "sufficiency_all", None),
            ("pointing (every target)", "pointing", None),
            ("recall: object patches kept (every target)", "recall", None),
            ("precision: kept patches on the object (every target)", "precision", None),
        ], "targets predicted with every patch", ("sufficiency_gain", "the same predicted targets", 0.15))),
        "shapes-clip": ("mask.json", mask_table("shapes-clip", [
            ("the caption ranks first among the scene's captions with only the kept patches (every caption)",
             "sufficiency_all", 0.85),
            ("the same over the captions that rank first with every patch", "sufficiency", None),
            ("complement: those captions no longer rank first with the kept patches removed", "complement", None),
            ("pointing (every caption)", "pointing", None),
            ("recall: object patches kept (every caption)", "recall", None),
            ("precision: kept patches on the object (every caption)", "precision", None),
        ], "captions ranked first with every patch", ("sufficiency_all_gain", "every caption", None))),
    },
}


def render(card: str, text: str, benchmarks: Path = BENCHMARKS) -> str:
    """`text` (a card's markdown) with each marked table rendered from its JSON in `benchmarks`."""
    blocks = CARDS[card]
    found = [match["name"] for match in MARKED.finditer(text)]
    if sorted(found) != sorted(blocks):
        raise ValueError(f"{card}: marked tables {found}, expected {sorted(blocks)}")

    def table(match: re.Match) -> str:
        source, make = blocks[match["name"]]
        figures = json.loads((benchmarks / source).read_text())
        return match.group(1) + make(figures) + match.group(4)

    return MARKED.sub(table, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a card is out of date")
    args = parser.parse_args()
    stale = []
    for card in CARDS:
        path = ROOT / card
        text = path.read_text()
        rendered = render(card, text)
        if rendered != text:
            stale.append(card)
            if not args.check:
                path.write_text(rendered)
    if stale:
        print(("out of date: " if args.check else "rewrote: ") + ", ".join(stale), file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
