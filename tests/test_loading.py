"""Loading real model formats from checkpoints made here: open_clip by name + file, HF folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xattn_cli.errors import UsageError
from xattn_cli.models.registry import load_model, resolve
from helpers import TINY_VIT, save_tiny_hf_clip


@pytest.fixture
def tiny_openclip_arch(tmp_path, monkeypatch):
    """A tiny architecture registered with open_clip under a new name, like a user's model config."""
    import open_clip

    config = tmp_path / "configs" / "xattn-tiny.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_VIT | {"text_cfg": TINY_VIT["text_cfg"] | {"vocab_size": 49408,
                                                                                 "context_length": 77}}))
    open_clip.add_model_config(config)
    return "xattn-tiny"


def test_openclip_by_name_with_a_safetensors_checkpoint(tiny_openclip_arch, tmp_path):
    import open_clip

    torch.manual_seed(1)
    reference = open_clip.create_model(tiny_openclip_arch)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(checkpoint))
    adapter = load_model(f"openclip:{tiny_openclip_arch}", str(checkpoint))
    for key, value in reference.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[key], value)
    embedding = adapter.text_embeddings(["a dog"], ensemble=False)
    assert embedding.shape == (1, 32)


def test_pt_checkpoint_loads_with_weights_only(tiny_openclip_arch, tmp_path):
    import open_clip

    reference = open_clip.create_model(tiny_openclip_arch)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, checkpoint)
    adapter = load_model(f"openclip:{tiny_openclip_arch}", str(checkpoint))
    assert torch.equal(adapter.model.visual.proj, reference.visual.proj)


def test_mismatched_checkpoint_names_the_first_bad_key(tiny_openclip_arch, tmp_path):
    import open_clip

    state = open_clip.create_model(tiny_openclip_arch).state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    checkpoint = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    with pytest.raises(UsageError, match="visual.proj"):
        load_model(f"openclip:{tiny_openclip_arch}", str(checkpoint))


def test_unknown_names_are_usage_errors():
    for name in ("nope", "openclip:NoSuchArch", "hf:/no/such/folder"):
        with pytest.raises(UsageError):
            load_model(name)
    with pytest.raises(UsageError, match="shapes-clip"):
        load_model("clip")  # HF_HUB_OFFLINE is set by conftest: fails fast, names the bundled model


def test_hf_clip_folder_loads_and_explains(tmp_path):
    from PIL import Image

    from xattn_cli.explainers.surgery import SurgeryExplainer

    model = save_tiny_hf_clip(tmp_path / "hf-clip")
    adapter = load_model(f"hf:{tmp_path / 'hf-clip'}")
    assert adapter.native_size == (32, 32) and adapter.default_surgery_blocks == 3
    for key, value in model.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[key], value)
    targets = SurgeryExplainer(adapter, ["red", "blue"], ensemble=False).explain([Image.new("RGB", (50, 40))])[0]
    assert [t.map.shape for t in targets] == [(40, 50), (40, 50)]


def test_hf_folder_through_the_cli_keeps_stderr_quiet(tmp_path):
    """transformers' loading progress bar would be noise on stderr, which is for xattn's own lines."""
    import subprocess
    import sys

    from xattn_cli.world.shapes import scene_at

    save_tiny_hf_clip(tmp_path / "hf-clip")
    scene_at(1, 0, size=40).image.save(tmp_path / "scene.png")
    completed = subprocess.run([sys.executable, "-m", "xattn_cli", "surgery", str(tmp_path / "scene.png"),
                                "--text", "red", "--no-ensemble", "--model", f"hf:{tmp_path / 'hf-clip'}",
                                "--out", str(tmp_path / "out"), "-f", "jsonl"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stderr == ""


def test_resolve_splits_prefixes():
    assert resolve("openclip:ViT-B-16")[1] == "ViT-B-16"
    assert resolve("shapes-clip")[1] is None
