"""Hugging Face models by folder or repo id; the family comes from the saved config."""
from __future__ import annotations

import json
from pathlib import Path

from xattn_cli.errors import UsageError


def load_hf(location: str):
    """A `save_pretrained` folder (or a hub repo id, when a network is there) as an adapter.

    transformers' loading progress bar is off meanwhile: stderr is for xattn's own lines.
    """
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        return _load_by_family(location)
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _load_by_family(location: str):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(location)
    except Exception as error:
        raise UsageError(f"cannot read a Hugging Face config from {location!r}: {type(error).__name__}") from None
    if config.model_type == "clip":
        return _load_clip(location)
    if config.model_type == "vit":
        return _load_vit(location)
    if config.model_type in ("lxmert", "visual_bert"):
        return _load_region_vqa(location, config.model_type)
    if config.model_type == "detr":
        return _load_detr(location)
    raise UsageError(f"Hugging Face model type {config.model_type!r} is not supported "
                     "(supported: clip, vit, lxmert, visual_bert, detr)")


def _json_file(location: str, name: str) -> dict:
    path = Path(location) / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _with_processor_statistics(adapter, location: str):
    """The adapter, with the mean and std of the folder's `preprocessor_config.json` if it has one."""
    processor = _json_file(location, "preprocessor_config.json")
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


def _region_source(location: str):
    """Grid regions when the folder's `xattn.json` names them ({"regions": {"grid": [r, c], "cell": n}}, plus
    "stem": {"widths": [...], "weights": FILE} when a trained conv stem computes the cell features);
    otherwise None: the caller supplies features (--features FILE.npz)."""
    from xattn_cli.models.regions import GridRegions, StemGridRegions

    spec = _json_file(location, "xattn.json").get("regions")
    if spec and "stem" in spec:
        return StemGridRegions.from_folder(location, spec)
    return GridRegions(tuple(spec["grid"]), spec["cell"]) if spec else None


def _load_region_vqa(location: str, model_type: str):
    import transformers

    from xattn_cli.models.lxmert import LxmertAdapter
    from xattn_cli.models.visualbert import VisualBertAdapter

    model_class, adapter_class = {"lxmert": (transformers.LxmertForQuestionAnswering, LxmertAdapter),
                                  "visual_bert": (transformers.VisualBertForQuestionAnswering, VisualBertAdapter)}[model_type]
    try:
        model = model_class.from_pretrained(location)
        tokenizer = transformers.AutoTokenizer.from_pretrained(location)
    except Exception as error:
        raise UsageError(f"cannot load {model_type} from {location!r}: {type(error).__name__}: {error}".splitlines()[0]) from None
    return adapter_class(model.float(), tokenizer, _region_source(location), name=f"hf:{location}")


def _load_detr(location: str):
    import transformers

    from xattn_cli.models.detr import DetrAdapter

    try:
        model = transformers.DetrForObjectDetection.from_pretrained(location)
    except Exception as error:
        raise UsageError(f"cannot load DETR from {location!r}: {type(error).__name__}: {error}".splitlines()[0]) from None
    size = _json_file(location, "preprocessor_config.json").get("size", {})
    side = size.get("shortest_edge", 800)
    adapter = DetrAdapter(model.float(), name=f"hf:{location}", size=(size.get("height", side), size.get("width", side)))
    return _with_processor_statistics(adapter, location)
