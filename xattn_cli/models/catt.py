"""shapes-catt: a small VQA model over grid regions with causal attention (CATT; Yang et al., CVPR 2021) in
its vision block, as shared/reference/catt.md §3 lays it out.

    regions (stem features + boxes) → vision block: self-attention layers, the last a `CausalAttention`
        (region queries; IS = self-attention over the image's regions, CS = over a K-entry dictionary)
    question (words + positions) → self-attention layers
    question → image fusion (`CrossAttention` layers) → answer head on [CLS]

Every layer is attention + residual + LayerNorm, then a GELU feed-forward + residual + LayerNorm (post-norm,
as BERT). `use_dictionary=False` is shapes-catt-base: the last vision layer keeps its IS branch (the same
parameter names) and drops CS-ATT and `combine`. The CS-ATT reads the region tokens entering the last vision
layer: `dictionary_features` returns exactly those, for k-means (`xattn_cli.dictionary`).

A model folder (what `train/shapes_catt.py` writes; `hf:DIR` loads it, `load_catt_folder`):

    config.json              {"model_type": "xattn-catt", "answers": [...], "vocab_size", "visual_dim", "dim",
                              "heads", "question_layers", "vision_layers", "fusion_layers", "max_tokens",
                              "dictionary_size", "use_dictionary", "dropout"}
    model.safetensors        the model's state, the dictionary entries included
    region_stem.safetensors  the `GridStem`; xattn.json {"regions": {"grid", "cell", "stem"}} names it
    vocab.txt                the word-level BERT vocabulary
    dictionary.safetensors   optional, `xattn-dictionary/1`: its entries replace the model's, and its
                             members (image names, region index) explain each entry in records
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from xattn_cli.capture import AttentionSite
from xattn_cli.errors import UsageError
from xattn_cli.models.layout import LAYOUTS
from xattn_cli.models.regions import Regions, RegionSource, RegionVqaAdapter, StemGridRegions
from xattn_cli.nn import CausalAttention, CrossAttention

MODEL_TYPE = "xattn-catt"
CONFIG_KEYS = ("answers", "vocab_size", "visual_dim", "dim", "heads", "question_layers", "vision_layers",
               "fusion_layers", "max_tokens", "dictionary_size", "use_dictionary", "dropout")
DICTIONARY_FILE = "dictionary.safetensors"


class InSampleAttention(nn.Module):
    """The IS branch of a causal attention alone (shapes-catt-base): a `CausalAttention`'s call signature and
    parameter names, no CS probabilities."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.in_sample = CrossAttention(dim, dim, dim, heads, dropout)

    def forward(self, queries, context, context_mask=None, query_mask=None):
        output, probs = self.in_sample(queries, context, context_mask, query_mask)  # (B, Nq, dim)
        return output, probs, None


class Layer(nn.Module):
    """Attention + residual + LayerNorm, then feed-forward + residual + LayerNorm."""

    def __init__(self, attention: nn.Module, dim: int):
        super().__init__()
        self.attention = attention
        self.attention_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, queries, context, context_mask, query_mask):
        attended = self.attention(queries, context, context_mask, query_mask)[0]  # (B, Nq, dim)
        hidden = self.attention_norm(queries + attended)
        return self.output_norm(hidden + self.feed_forward(hidden))


class CattVqa(nn.Module):
    """The network (module docstring); `config` holds the `CONFIG_KEYS`."""

    def __init__(self, config: dict):
        super().__init__()
        dim, heads, dropout = config["dim"], config["heads"], config["dropout"]
        self.config = dict(config)
        self.words = nn.Embedding(config["vocab_size"], dim, padding_idx=0)
        self.positions = nn.Embedding(config["max_tokens"], dim)
        self.text_norm = nn.LayerNorm(dim)
        self.visual = nn.Linear(config["visual_dim"], dim)
        self.box = nn.Linear(4, dim)
        self.region_norm = nn.LayerNorm(dim)
        self.question = nn.ModuleList(Layer(CrossAttention(dim, dim, dim, heads, dropout), dim)
                                      for _ in range(config["question_layers"]))
        vision = [Layer(InSampleAttention(dim, heads, dropout), dim) for _ in range(config["vision_layers"] - 1)]
        last = (CausalAttention(dim, dim, dim, heads, config["dictionary_size"], dropout=dropout)
                if config["use_dictionary"] else InSampleAttention(dim, heads, dropout))
        self.vision = nn.ModuleList([*vision, Layer(last, dim)])
        self.fusion = nn.ModuleList(Layer(CrossAttention(dim, dim, dim, heads, dropout), dim)
                                    for _ in range(config["fusion_layers"]))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim),
                                  nn.Linear(dim, len(config["answers"])))

    @property
    def causal(self) -> CausalAttention | None:
        """The last vision layer's causal attention (None for the base model)."""
        attention = self.vision[-1].attention
        return attention if isinstance(attention, CausalAttention) else None

    def causal_input(self, features: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The region tokens entering the last vision layer: its IS and CS queries. (B, R, dim)."""
        image = self.region_norm(self.visual(features) + self.box(boxes))  # (B, R, dim)
        for layer in self.vision[:-1]:
            image = layer(image, image, mask, mask)
        return image

    def forward(self, input_ids: torch.Tensor, text_mask: torch.Tensor, features: torch.Tensor,
                boxes: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, answers) read at [CLS] (token 0)."""
        image = self.causal_input(features, boxes, region_mask)  # (B, R, dim)
        image = self.vision[-1](image, image, region_mask, region_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = self.text_norm(self.words(input_ids) + self.positions(positions))  # (B, T, dim)
        for layer in self.question:
            text = layer(text, text, text_mask, text_mask)
        for layer in self.fusion:
            text = layer(text, image, region_mask, text_mask)
        return self.head(text[:, 0])  # (B, answers)


class CattAdapter(RegionVqaAdapter):
    family = "catt"
    layout = LAYOUTS["catt"]

    def __init__(self, model: CattVqa, tokenizer, regions: RegionSource | None = None, name: str = "catt",
                 dictionary=None):
        super().__init__(model, tokenizer, regions)
        self.name = name
        self.answers = list(model.config["answers"])
        self.dictionary = dictionary  # a `dictionary.DictionaryFile` whose members explain the entries, or None

    def tokenize(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = super().tokenize(questions)
        longest, most = batch["input_ids"].shape[1], self.model.config["max_tokens"]
        if longest > most:
            raise UsageError(f"a question of {longest} tokens ([CLS] and [SEP] included) is longer than the "
                             f"{most} {self.name} reads")
        return batch

    def answer_logits(self, batch: dict[str, torch.Tensor], regions: Regions) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], regions.features, regions.boxes,
                          regions.mask)  # (B, answers)

    def attention_sites(self) -> list[AttentionSite]:
        """Question self-attention ("self", "text"), each vision layer's IS ("self", "vision"), the causal
        layer's CS ("cross", "vision->dictionary", its IS's layer number), fusion ("cross", "text->vision")."""
        def site(module, kind, stream, layer):
            return AttentionSite(module, kind, stream, layer, "dropout", "attn_drop")

        model = self.model
        sites = [site(layer.attention, "self", "text", j) for j, layer in enumerate(model.question)]
        sites += [site(layer.attention.in_sample, "self", "vision", j) for j, layer in enumerate(model.vision)]
        if model.causal is not None:
            sites.append(site(model.causal.cross_sample, "cross", "vision->dictionary", len(model.vision) - 1))
        return sites + [site(layer.attention, "cross", "text->vision", j) for j, layer in enumerate(model.fusion)]

    @torch.no_grad()
    def dictionary_features(self, images: Sequence[Image.Image]) -> Regions:
        """Exactly the tokens CS-ATT reads: the region tokens entering the last vision layer, (B, R, dim),
        with the regions' boxes, mask and grid."""
        regions = self.regions(images, [f"image{i}" for i in range(len(images))]).to(self.device)
        tokens = self.model.causal_input(regions.features, regions.boxes, regions.mask)  # (B, R, dim)
        return Regions(tokens, regions.boxes, regions.mask, regions.grid)

    @property
    def dictionary_size(self) -> int:
        return 0 if self.model.causal is None else self.model.causal.dictionary.shape[0]

    def load_dictionary(self, dictionary) -> None:
        """Use a `DictionaryFile`'s entries (its shape must fit) and keep its members to explain them."""
        if self.model.causal is None:
            raise UsageError(f"{self.name} has no causal attention: a dictionary does not apply")
        self.model.causal.load_dictionary(dictionary.entries.to(self.model.causal.dictionary))
        self.dictionary = dictionary

    def load_dictionary_file(self, path: str | Path) -> None:
        """`load_dictionary` of the dictionary file at `path` (`xattn-dictionary/1`), which must hold this model's
        K entries of its width. This changes the model: its answers may change."""
        from xattn_cli.dictionary import load_dictionary

        if self.model.causal is None:
            raise UsageError(f"{self.name} has no causal attention: a dictionary does not apply")
        self.load_dictionary(load_dictionary(path, k=self.dictionary_size, dim=self.model.causal.dictionary.shape[1]))

    def dictionary_entries(self, relevance: torch.Tensor, top: int = 5) -> list[dict]:
        """The `top` entries of highest relevance (K,): entry index, relevance, size (points the entry
        stands for) and member regions (image name, region index), when the dictionary file is known."""
        order = relevance.detach().float().cpu().argsort(descending=True, stable=True)[:top]
        entries = []
        for entry in order.tolist():
            item = {"entry": entry, "relevance": float(f"{float(relevance[entry]):.6g}")}  # 6 significant digits
            if self.dictionary is not None:
                members = self.dictionary.members[entry].tolist()
                item["count"] = int(self.dictionary.counts[entry])
                item["members"] = [{"image": self.dictionary.names[row], "region": region} for row, region in members]
            entries.append(item)
        return entries


def build_catt(cfg: dict, tokenizer, answers: Sequence[str], *, use_dictionary: bool, name: str = "catt"
               ) -> CattAdapter:
    """A fresh model of `cfg` (configs/shapes-catt.json: "model" widths and layer counts, "regions" grid,
    cell and stem widths) with `answers`, its visual tokens from a fresh `GridStem`."""
    from xattn_cli.models.regions import GridStem

    spec = cfg["regions"]
    stem = GridStem(spec["stem"]["widths"], spec["cell"])
    model = CattVqa({**cfg["model"], "answers": list(answers), "vocab_size": len(tokenizer), "visual_dim": stem.dim,
                     "use_dictionary": use_dictionary})
    return CattAdapter(model, tokenizer, StemGridRegions(stem, tuple(spec["grid"]), spec["cell"]), name=name)


def is_catt_folder(location: str | Path) -> bool:
    """Whether `location` is a CATT model folder (its config.json says model_type xattn-catt)."""
    config = Path(location) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def save_catt_folder(adapter: CattAdapter, folder: str | Path, regions_spec: dict, dtype=torch.float32) -> None:
    """Write `adapter` as a model folder (module docstring); `regions_spec` = {"grid", "cell", "stem":
    {"widths"}}. The tokenizer's `vocab.txt` must already be in `folder` or is saved there."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, stem = adapter.model, adapter.regions.stem

    def tensors(module):
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}

    save_file(tensors(model), str(folder / "model.safetensors"))
    save_file(tensors(stem), str(folder / "region_stem.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **model.config}, indent=2) + "\n")
    xattn = json.loads((folder / "xattn.json").read_text()) if (folder / "xattn.json").is_file() else {}
    regions = {**regions_spec, "stem": {**regions_spec["stem"], "weights": "region_stem.safetensors"}}
    (folder / "xattn.json").write_text(json.dumps({**xattn, "regions": regions}, indent=2) + "\n")
    if not (folder / "vocab.txt").is_file():
        adapter.tokenizer.save_vocabulary(str(folder))


def load_catt_folder(location: str | Path, name: str | None = None) -> CattAdapter:
    """A CATT model folder (module docstring) as an adapter; a dictionary file there replaces the entries."""
    import transformers

    from xattn_cli.models.checkpoints import load_into, load_state_dict

    folder = Path(location)
    config = json.loads((folder / "config.json").read_text())
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise UsageError(f"{folder}/config.json lacks {', '.join(missing)}")
    if not (folder / "vocab.txt").is_file():
        raise UsageError(f"{folder} has no vocab.txt")
    model = CattVqa({key: config[key] for key in CONFIG_KEYS})
    weights = folder / "model.safetensors"
    load_into(model, load_state_dict(weights), str(weights))
    spec = json.loads((folder / "xattn.json").read_text())["regions"]
    regions = StemGridRegions.from_folder(folder, spec)
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    adapter = CattAdapter(model.float(), tokenizer, regions, name=name or f"hf:{location}")
    if (folder / DICTIONARY_FILE).is_file():
        adapter.load_dictionary_file(folder / DICTIONARY_FILE)
    return adapter
