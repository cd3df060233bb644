"""Hugging Face models by folder or repo id; the family comes from the saved config."""
from __future__ import annotations

import json
from pathlib import Path

from xattn_cli.errors import UsageError


TOKENIZER_FILES = {  # what a folder needs for its texts to tokenize: any one of the sets
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "bert": (("tokenizer.json",), ("vocab.txt",)),
}


def load_hf(location: str, name: str | None = None):
    """A `save_pretrained` folder (or a hub repo id, when a network is there) as an adapter named `name`
    (default `hf:LOCATION`).

    transformers' loading progress bar is off meanwhile: stderr is for xattn's own lines.
    """
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        adapter = _load_by_family(location)
    finally:
        if was_enabled:
            logging.enable_progress_bar()
    adapter.name = name or f"hf:{location}"
    return adapter


def cached_snapshot(repo: str) -> str | None:
    """The folder of `repo`'s snapshot in the Hugging Face cache (refs/main), or None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:  # not cached, or not a repo id: the caller says why in one line
        return None


def require_tokenizer_files(location: str, kind: str) -> None:
    """A usage error when a local folder lacks tokenizer files: transformers would build an empty tokenizer
    and every text would become the same ids (equal scores, flat maps)."""
    folder = Path(location)
    if not folder.is_dir():
        return  # a hub repo id: transformers fetches them
    choices = TOKENIZER_FILES[kind]
    if not any(all((folder / file).is_file() for file in files) for files in choices):
        wanted = " or ".join(" + ".join(files) for files in choices)
        raise UsageError(f"{location} has no tokenizer files ({wanted}); copy them from the model's original "
                         "repo (save its tokenizer with save_pretrained)")


def _load_by_family(location: str):
    import transformers

    from xattn_cli.models.catt import is_catt_folder, load_catt_folder

    if is_catt_folder(location):  # not a transformers model: xattn's own folder of the same shape
        return load_catt_folder(location)
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


def image_processor_config(location: str) -> dict:
    """The folder's image-processor settings: `preprocessor_config.json`, or the "image_processor" part of
    the `processor_config.json` that transformers 5 writes; {} when it has neither."""
    config = _json_file(location, "preprocessor_config.json")
    return config or _json_file(location, "processor_config.json").get("image_processor", {})


def _with_processor_statistics(adapter, location: str):
    """The adapter, with the mean and std of the folder's image processor if it has one."""
    processor = image_processor_config(location)
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

    require_tokenizer_files(location, "clip")
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
    require_tokenizer_files(location, "bert")
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
    processor = image_processor_config(location)
    size = processor.get("size", {})
    if isinstance(size, int):  # older processor files: "size": 800, "max_size": 1333, as transformers reads them
        size = {"shortest_edge": size, "longest_edge": processor.get("max_size", 1333)}
    side = size.get("shortest_edge", 800)
    edges = None if "height" in size else (side, size.get("longest_edge", 1333))  # fixed size: squashed, as HF does
    adapter = DetrAdapter(model.float(), name=f"hf:{location}", edges=edges,
                          size=(size.get("height", side), size.get("width", side)))
    return _with_processor_statistics(adapter, location)
