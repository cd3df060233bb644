"""Hugging Face models by folder or repo id; the family comes from the saved config."""
from __future__ import annotations

import json
from pathlib import Path

from xattn_cli.errors import UsageError


def load_hf(location: str):
    """A `save_pretrained` folder (or a hub repo id, when a network is there) as an adapter."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(location)
    except Exception as error:
        raise UsageError(f"cannot read a Hugging Face config from {location!r}: {type(error).__name__}") from None
    if config.model_type == "clip":
        return _load_clip(location)
    if config.model_type == "vit":
        return _load_vit(location)
    raise UsageError(f"Hugging Face model type {config.model_type!r} is not supported (supported: clip, vit)")


def _with_processor_statistics(adapter, location: str):
    """The adapter, with the mean and std of the folder's `preprocessor_config.json` if it has one."""
    processor_file = Path(location) / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    adapter.mean = processor.get("image_mean", adapter.mean)
    adapter.std = processor.get("image_std", adapter.std)
    return adapter


def _load_vit(location: str):
    import transformers

    from xattn_cli.models.vit import HFViTAdapter

    try:
        model = transformers.ViTForImageClassification.from_pretrained(location)
    except Exception as error:
        raise UsageError(f"cannot load ViT from {location!r}: {type(error).__name__}: {error}".splitlines()[0]) from None
    return _with_processor_statistics(HFViTAdapter(model.float(), name=f"hf:{location}"), location)


def _load_clip(location: str):
    import transformers

    from xattn_cli.models.hf_clip import HFClipAdapter

    try:
        model = transformers.CLIPModel.from_pretrained(location, attn_implementation="eager")
        tokenizer = transformers.AutoTokenizer.from_pretrained(location)
    except Exception as error:
        raise UsageError(f"cannot load CLIP from {location!r}: {type(error).__name__}: {error}".splitlines()[0]) from None
    return _with_processor_statistics(HFClipAdapter(model.float(), tokenizer, name=f"hf:{location}"), location)
