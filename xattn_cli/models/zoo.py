"""Public models by name: the aliases (`clip`, `vit`, `lxmert`, `visualbert`, `detr`) and the `openclip:`, `hf:`
and `timm:` prefixes. They download when a hub can be reached, else read the Hugging Face cache or local files."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

from xattn_cli.config import load_config
from xattn_cli.errors import UsageError
from xattn_cli.models.registry import register_model

OFFLINE_HINT = "no model hub could be reached; use the bundled {bundled} offline"


def require_hub(what: str, bundled: str) -> None:
    """Fail fast, before any download retries, when the Hugging Face hub cannot be resolved."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise UsageError(f"cannot download {what}: HF_HUB_OFFLINE is set; use the bundled {bundled} offline")
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        raise UsageError(f"cannot download {what}: " + OFFLINE_HINT.format(bundled=bundled)) from None


def local_or_hub(repo: str, bundled: str) -> str:
    """A folder as is; a hub repo id as is when the hub can be reached, else its snapshot in the Hugging
    Face cache (HF_HOME / HF_HUB_CACHE), the offline workflow; a usage error when it is in neither."""
    from xattn_cli.models.hf import cached_snapshot

    if Path(repo).exists():
        return repo
    try:
        require_hub(repo, bundled)
    except UsageError as error:
        snapshot = cached_snapshot(repo)
        if snapshot is None:
            raise UsageError(f"{error} (and {repo} is not in the Hugging Face cache)") from None
        return snapshot
    return repo


@register_model("clip", "clip", load_config("clip")["description"])
def clip_alias(pretrained: str | None = None, *, trust_checkpoint: bool = False):
    cfg = load_config("clip")
    arch = cfg["source"].removeprefix("openclip:")
    return openclip_model(arch, pretrained or cfg["pretrained"], trust_checkpoint=trust_checkpoint,
                          weights_tag=cfg["pretrained"])  # a file given here holds the alias's weights


@register_model("openclip", "clip", "open_clip architecture by name; --pretrained TAG|PATH "
                "(random weights without it); image towers: ViT, ModifiedResNet, timm ViT/SigLIP/EVA02",
                prefix=True)
def openclip_model(arch: str, pretrained: str | None = None, *, trust_checkpoint: bool = False,
                   weights_tag: str | None = None):
    """`pretrained` is an open_clip tag or a file; a file is read as weights of `weights_tag` (the alias's
    tag) when given. The model is built as open_clip builds it for that tag (QuickGELU for OpenAI's
    weights, and for TorchScript archives, which are OpenAI's), with the tag's mean and std."""
    import open_clip

    from xattn_cli.models.checkpoints import built_for_weights, is_torchscript, load_into, load_state_dict
    from xattn_cli.models.openclip import OpenClipAdapter

    if arch not in open_clip.list_models():
        raise UsageError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
    is_path = pretrained is not None and (Path(pretrained).exists() or "/" in pretrained or "." in pretrained)
    tag = None if is_path else pretrained
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag or weights_tag or "")
    if tag is not None and not tag_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UsageError(f"open_clip {arch} has no pretrained tag {tag!r} (tags: {tags}); or give a file")
    try:  # before the model is built: SigLIP's Hugging Face tokenizer may be neither reachable nor cached
        tokenizer = open_clip.get_tokenizer(arch)
    except OSError as error:
        raise UsageError(f"cannot load the tokenizer of open_clip {arch}: {str(error).splitlines()[0]}") from None
    state = load_state_dict(pretrained, trust_checkpoint) if is_path else None
    quick_gelu = bool(tag_cfg.get("quick_gelu")) or (is_path and is_torchscript(Path(pretrained)))
    if tag is not None:
        require_hub(f"open_clip {arch} weights {tag!r}", load_config("clip")["offline_alternative"])
    try:
        with built_for_weights() if state is not None else contextlib.nullcontext():
            model = open_clip.create_model(arch, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception as error:  # download failures come in many types
        raise UsageError(f"cannot load open_clip {arch} weights {pretrained!r}: {type(error).__name__}; "
                         + OFFLINE_HINT.format(bundled=load_config("clip")["offline_alternative"])) from None
    if state is not None:
        load_into(model, state, pretrained)
    elif tag is None:
        warnings.warn(f"openclip:{arch} runs with random weights (no --pretrained given)", stacklevel=2)
    adapter = OpenClipAdapter(model, tokenizer, name=f"openclip:{arch}")
    adapter.mean, adapter.std = tag_cfg.get("mean", adapter.mean), tag_cfg.get("std", adapter.std)
    return adapter


def register_hf_alias(name: str) -> None:
    """`name` (configs/<name>.json) loads its Hugging Face `source`, or the folder `--pretrained` names;
    offline it fails fast and names the bundled model of the same family."""
    cfg = load_config(name)

    @register_model(name, cfg["family"], cfg["description"])
    def load(pretrained: str | None = None, *, trust_checkpoint: bool = False):
        from xattn_cli.models.hf import load_hf

        repo = pretrained or cfg["source"].removeprefix("hf:")
        return load_hf(local_or_hub(repo, cfg["offline_alternative"]), name=f"hf:{repo}")


for _name in ("vit", "lxmert", "visualbert", "detr"):
    register_hf_alias(_name)


@register_model("hf", "auto", "Hugging Face model folder or repo; the family comes from "
                "its config: clip, vit, lxmert, visualbert (--question), detr (detections); or a CATT model folder", prefix=True)
def hf_model(location: str, pretrained: str | None = None, *, trust_checkpoint: bool = False):
    from xattn_cli.models.hf import load_hf

    if pretrained is not None:
        raise UsageError(f"pretrained weights do not apply to hf:{location}: the folder or repo holds them")
    return load_hf(local_or_hub(location, "shapes-* model of the same family"), name=f"hf:{location}")


@register_model("timm", "vit", "timm ViT by name; --pretrained PATH (random weights without it)",
                prefix=True)
def timm_model(name: str, pretrained: str | None = None, *, trust_checkpoint: bool = False):
    import timm

    from xattn_cli.models.checkpoints import load_into, load_state_dict
    from xattn_cli.models.vit import TimmViTAdapter

    if name not in timm.list_models():
        raise UsageError(f"unknown timm model {name!r} (see timm.list_models())")
    state = load_state_dict(pretrained, trust_checkpoint) if pretrained else {}
    head = state.get("head.weight")  # a fine-tuned head sets the class count (--labels names the classes)
    model = timm.create_model(name, pretrained=False, **({} if head is None else {"num_classes": head.shape[0]}))
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise UsageError(f"timm model {name!r} is not a plain ViT; relevancy needs one")
    if getattr(model, "cls_token", None) is None or model.global_pool != "token":
        raise UsageError(f"timm model {name!r} pools its image tokens (global_pool {model.global_pool!r}) instead of "
                         "reading a CLS token; relevancy and token masks explain the CLS token's row")
    if state:
        load_into(model, state, pretrained)
    else:
        warnings.warn(f"timm:{name} runs with random weights (no --pretrained given)", stacklevel=2)
    return TimmViTAdapter(model, name=f"timm:{name}")
