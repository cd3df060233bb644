"""The bundled shapes-* models: tiny models of the real architectures trained on the shapes world, shipped
as package data (configs/ names their files). `--pretrained` loads other weights of the same kind."""
from __future__ import annotations

from pathlib import Path

from xattn_cli.config import data_path, load_config
from xattn_cli.errors import UsageError
from xattn_cli.models.registry import register_model


@register_model("shapes-clip", "clip", "open_clip ViT CLIP trained on the shapes world",
                bundled=True, weights="assets/weights/shapes-clip.safetensors")
def shapes_clip(pretrained: str | None = None, *, trust_checkpoint: bool = False):
    return load_bundled_clip("shapes-clip", pretrained, trust_checkpoint)


def load_bundled_clip(name: str, pretrained: str | None, trust_checkpoint: bool = False):

    from xattn_cli.models.checkpoints import load_into, load_state_dict
    from xattn_cli.models.openclip import OpenClipAdapter, build_clip
    from xattn_cli.text import WordTokenizer

    cfg = load_config(name)
    tokenizer = WordTokenizer.from_file(data_path(cfg["vocabulary"]), cfg["arch"]["text_cfg"]["context_length"])
    model = build_clip(cfg["arch"], vocab_size=len(tokenizer.vocab))
    weights = Path(pretrained) if pretrained else data_path(cfg["weights"])
    load_into(model, load_state_dict(weights, trust_checkpoint), str(weights))
    adapter = OpenClipAdapter(model.float(), tokenizer, name=name)
    adapter.default_surgery_blocks = cfg["surgery"]["blocks"]
    size = cfg["surgery"].get("size")
    adapter.default_surgery_size = (size, size) if size else None
    return adapter


@register_model("shapes-vit", "vit", "Hugging Face ViT: which shapes are in the scene",
                bundled=True, weights="assets/weights/shapes-vit.safetensors")
def shapes_vit(pretrained: str | None = None, *, trust_checkpoint: bool = False):

    from xattn_cli.models.checkpoints import load_into, load_state_dict
    from xattn_cli.models.vit import HFViTAdapter, build_vit

    cfg = load_config("shapes-vit")
    model = build_vit(cfg)
    weights = Path(pretrained) if pretrained else data_path(cfg["weights"])
    load_into(model, load_state_dict(weights, trust_checkpoint), str(weights))
    adapter = HFViTAdapter(model.float(), name="shapes-vit")
    adapter.mean, adapter.std = cfg["preprocess"]["mean"], cfg["preprocess"]["std"]
    return adapter


def register_bundled_hf(name: str) -> None:
    """A bundled shapes-* model kept as a `save_pretrained` folder (configs/<name>.json names it);
    `--pretrained DIR` loads another folder of the same kind instead."""
    cfg = load_config(name)
    folder = cfg["folder"]

    @register_model(name, cfg["family"], cfg["description"], bundled=True,
                    weights=f"{folder}/model.safetensors")
    def load(pretrained: str | None = None, *, trust_checkpoint: bool = False):

        from xattn_cli.models.hf import load_hf

        location = Path(pretrained) if pretrained else data_path(folder)
        if not (location / "config.json").is_file():
            raise UsageError(f"{name}: no model folder at {location} (config.json missing)")
        adapter = load_hf(str(location))
        adapter.name = name
        return adapter


for _name in ("shapes-lxmert", "shapes-visualbert", "shapes-detr", "shapes-catt", "shapes-catt-base"):
    register_bundled_hf(_name)
