"""Real checkpoint formats, random weights, through the real CLI in a subprocess (issue 14).

Every file is built here the way its tool writes it: `save_pretrained` folders with and without tokenizer
files, open_clip state dicts as .safetensors / .pt / training checkpoints / a TorchScript archive with
OpenAI's key names, timm files with 1000 and 5 classes, and a Hugging Face cache on an offline machine.
Valid formats give right results (one set of weights as an open_clip file and as an HF folder gives the
same maps); the others fail in one stderr line. No run ever prints a traceback.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_coattention_reference import ANSWERS, CELL, GRID, WORDS, _detr_model, _lxmert_model, _visualbert_model

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)  # open_clip's BPE tokenizer
ARCHS = {  # tiny open_clip configs, registered in the CLI's process by PRELUDE
    "xattn-tiny": dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                                     head_width=32), text_cfg=TEXT_CFG),
    "xattn-tiny-rn": dict(embed_dim=32, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16,
                                                        head_width=8), text_cfg=TEXT_CFG),
}
ARCHS["xattn-tiny-quickgelu"] = ARCHS["xattn-tiny"] | {"quick_gelu": True}
PRELUDE = """import os, sys, pathlib
folder = os.environ.get("XATTN_TEST_ARCHS")
if folder:
    import open_clip
    for config in sorted(pathlib.Path(folder).glob("*.json")):
        open_clip.add_model_config(config)
from xattn_cli.cli.app import main
main()
"""
LONG_TEXT = "a photo of " + "red " * 100  # ~100 BPE tokens: past CLIP's 77


def xattn(*args: str, env: dict[str, str] | None = None, prelude: str = PRELUDE) -> subprocess.CompletedProcess:
    """The CLI in a fresh process; asserts that nothing on stderr is a traceback."""
    completed = subprocess.run([sys.executable, "-c", prelude, *map(str, args)], capture_output=True, text=True,
                               env=os.environ | (env or {}), timeout=300)
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed


def one_line_error(completed: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == code and len(lines) == 1, completed.stderr
    assert lines[0].startswith("xattn: error: ") and all(f in lines[0] for f in fragments), lines[0]


def records(completed: subprocess.CompletedProcess) -> list[dict]:
    assert completed.returncode == 0, completed.stderr
    return [json.loads(line) for line in completed.stdout.splitlines()]


def saved_maps(out: Path) -> list[np.ndarray]:
    return [np.load(path) for path in sorted(out.rglob("*.npy"))]


# ------------------------------------------------------------------------------------------------
# building the files
# ------------------------------------------------------------------------------------------------


def _clip_bpe_files(folder: Path) -> None:
    """vocab.json + merges.txt of OpenAI's CLIP BPE, derived from open_clip's bundled vocabulary (its ids)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _openclip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip (OpenAI key names) → transformers `CLIPModel` key names, the same weights."""
    layer_parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
    converted = {"logit_scale": state["logit_scale"],
                 "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
                 "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
                 "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
                 "visual_projection.weight": state["visual.proj"].T,
                 "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
                 "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
                 "text_projection.weight": state["text_projection"].T}
    for ours, theirs in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                         ("ln_final", "text_model.final_layer_norm")):
        for kind in ("weight", "bias"):
            converted[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for tower, hf_tower in (("visual.transformer", "vision_model.encoder"), ("transformer", "text_model.encoder")):
        blocks = {key.split(".")[len(tower.split(".")) + 1] for key in state if key.startswith(f"{tower}.resblocks.")}
        for i in sorted(blocks):
            ours, theirs = f"{tower}.resblocks.{i}", f"{hf_tower}.layers.{i}"
            for part, hf_part in layer_parts.items():
                for kind in ("weight", "bias"):
                    converted[f"{theirs}.{hf_part}.{kind}"] = state[f"{ours}.{part}.{kind}"]
            for kind in ("weight", "bias"):
                q, k, v = state[f"{ours}.attn.in_proj_{kind}"].chunk(3, dim=0)
                for name, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    converted[f"{theirs}.self_attn.{name}.{kind}"] = tensor
    return converted


def _save_hf_clip(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """An HF CLIP folder as `save_pretrained` writes it, with its tokenizer and processor files."""
    import transformers

    folder.mkdir(parents=True)
    _clip_bpe_files(folder)
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, hidden_act="quick_gelu"),
        projection_dim=32)
    model = transformers.CLIPModel(config).eval()
    model.load_state_dict(_openclip_to_hf(state), strict=False)
    missing = {key for key in model.state_dict() if "position_ids" not in key} - set(_openclip_to_hf(state))
    assert not missing, missing
    model.save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)


def _without_tokenizer(folder: Path, target: Path) -> Path:
    """The same folder holding only the model files (config and weights), as `model.save_pretrained` leaves it."""
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def _traced_openai_archive(model: torch.nn.Module, path: Path) -> None:
    """A TorchScript archive like OpenAI's CLIP .pt files: the model's own (OpenAI) key names, plus the
    scalars OpenAI's archives carry."""
    import copy

    model = copy.deepcopy(model)
    del model.attn_mask  # open_clip's causal mask is not a weight (not persistent); OpenAI's archives lack it
    for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(model, name):
            delattr(model, name)  # open_clip keeps these as ints; OpenAI's archives as tensors
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices
        traced = torch.jit.trace_module(model, {"encode_image": torch.zeros(1, 3, 32, 32)}, check_trace=False)
    traced.save(str(path))


def _save_region_vqa(folder: Path, model, with_tokenizer: bool) -> None:
    import transformers

    model.config.id2label = {i: f"LABEL_{i}" for i in range(len(ANSWERS))}  # answers ship separately
    model.save_pretrained(folder)
    (folder / "xattn.json").write_text(json.dumps({"regions": {"grid": list(GRID), "cell": CELL}}))
    if with_tokenizer:
        (folder / "vocab.txt").write_text("\n".join(WORDS))
        transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)


def _hf_cache(root: Path, repo: str, source: Path) -> None:
    """`repo` in a Hugging Face cache under HF_HOME=root: hub/models--org--name/snapshots/REV + refs/main."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    entry = root / "hub" / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    import open_clip
    import timm
    import transformers

    root = tmp_path_factory.mktemp("formats")
    paths = {"root": root, "archs": root / "archs"}
    paths["archs"].mkdir()
    for name, arch in ARCHS.items():
        (paths["archs"] / f"{name}.json").write_text(json.dumps(arch))
        open_clip.add_model_config(paths["archs"] / f"{name}.json")

    torch.manual_seed(0)
    model = open_clip.create_model("xattn-tiny-quickgelu").eval()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(root / "vit.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "vit-epoch3.pt")
    _traced_openai_archive(model, root / "ViT-tiny-openai.pt")
    _save_hf_clip(root / "hf-clip", state)
    paths["hf-clip-bare"] = _without_tokenizer(root / "hf-clip", root / "hf-clip-bare")

    torch.manual_seed(1)
    resnet = open_clip.create_model("xattn-tiny-rn")
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(root / "rn.safetensors"))

    timm_model = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(root / "timm-1000.safetensors"))
    timm_five = timm.create_model("test_vit", pretrained=False, num_classes=5)
    torch.save({"model": timm_five.state_dict(), "epoch": 9}, root / "timm-5.pth")
    (root / "five.json").write_text(json.dumps(["cat", "dog", "fox", "owl", "yak"]))

    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label={0: "circle", 1: "square", 2: "star"}))
    vit.save_pretrained(root / "hf-vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "hf-vit")
    _hf_cache(root / "hf-home", "google/vit-base-patch16-224", root / "hf-vit")  # the `vit` alias's repo
    _hf_cache(root / "hf-home", "org/tiny-vit", root / "hf-vit")

    _save_region_vqa(root / "lxmert", _lxmert_model(), with_tokenizer=True)
    _save_region_vqa(root / "lxmert-bare", _lxmert_model(), with_tokenizer=False)
    _save_region_vqa(root / "visualbert", _visualbert_model(), with_tokenizer=True)
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    (root / "label2ans.json").write_text(json.dumps({str(i): a for i, a in enumerate(ANSWERS)}))

    from xattn_cli.world.shapes import scene_at

    scene_at(3, 0, size=48).image.save(root / "scene.png")
    paths.update({name: root / name for name in ("vit.safetensors", "vit-epoch3.pt", "ViT-tiny-openai.pt", "hf-clip",
                                                 "rn.safetensors", "timm-1000.safetensors", "timm-5.pth",
                                                 "five.json", "hf-vit", "hf-home", "lxmert", "lxmert-bare",
                                                 "visualbert", "answers.json", "label2ans.json", "scene.png")})
    return paths


def surgery(files, out: Path, *args: str) -> subprocess.CompletedProcess:
    return xattn("surgery", files["scene.png"], "--text", "red", "--text", LONG_TEXT, "--no-ensemble",
                 "--no-text-cache", "--save-maps", "--out", out, "-f", "jsonl", *args,
                 env={"XATTN_TEST_ARCHS": str(files["archs"])})


# ------------------------------------------------------------------------------------------------
# CLIP: open_clip files, HF folders, TorchScript archives
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openclip_maps(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("openclip-out")
    completed = surgery(files, out, "--model", "openclip:xattn-tiny-quickgelu", "--pretrained",
                        files["vit.safetensors"])
    assert [len(r["targets"]) for r in records(completed)] == [2]
    assert completed.stderr == ""  # open_clip's tokenizer truncates silently, as it always does
    return saved_maps(out)


def test_hf_folder_and_openclip_file_of_the_same_weights_give_the_same_maps(files, openclip_maps, tmp_path):
    completed = surgery(files, tmp_path, "--model", f"hf:{files['hf-clip']}")
    records(completed)
    hf_maps = saved_maps(tmp_path)
    assert len(hf_maps) == len(openclip_maps) == 2
    for ours, theirs in zip(openclip_maps, hf_maps):
        assert ours.std() > 1e-3  # a real map, not a flat one
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    notes = completed.stderr.strip().splitlines()  # the long text: said once, in one line
    assert len(notes) == 1 and "truncated" in notes[0] and notes[0].startswith("xattn: warning:"), completed.stderr


def test_training_checkpoint_with_module_prefix_loads(files, openclip_maps, tmp_path):
    records(surgery(files, tmp_path, "--model", "openclip:xattn-tiny-quickgelu", "--pretrained",
                    files["vit-epoch3.pt"]))
    for ours, theirs in zip(openclip_maps, saved_maps(tmp_path)):
        np.testing.assert_array_equal(ours, theirs)


def test_torchscript_archive_needs_trust_and_builds_quickgelu(files, openclip_maps, tmp_path):
    """OpenAI's .pt files are code: refused without --trust-checkpoint; with it, read as open_clip reads them,
    QuickGELU included even when the named architecture says GELU."""
    from xattn_cli.errors import UsageError
    from xattn_cli.models.checkpoints import load_state_dict

    with pytest.raises(UsageError, match="TorchScript archive, which holds code; pass --trust-checkpoint"):
        load_state_dict(files["ViT-tiny-openai.pt"])
    records(surgery(files, tmp_path / "ok", "--model", "openclip:xattn-tiny", "--pretrained",
                    files["ViT-tiny-openai.pt"], "--trust-checkpoint"))
    for ours, theirs in zip(openclip_maps, saved_maps(tmp_path / "ok")):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("folder, wanted", [("hf-clip-bare", "vocab.json + merges.txt"), ("lxmert-bare", "vocab.txt")])
def test_folders_without_tokenizer_files_are_refused(files, folder, wanted):
    """Without them transformers builds an empty tokenizer: every text the same ids, every word [UNK]."""
    from xattn_cli.errors import UsageError
    from xattn_cli.models.registry import load_model

    with pytest.raises(UsageError, match=f"has no tokenizer files .*{re.escape(wanted)}"):
        load_model(f"hf:{files[folder]}")


def test_refusal_through_the_cli_is_one_line(files, tmp_path):
    one_line_error(surgery(files, tmp_path, "--model", f"hf:{files['hf-clip-bare']}"), 2,
                   "no tokenizer files", "vocab.json + merges.txt")


def test_resnet_file_explains_and_refuses_blocks(files, tmp_path):
    from xattn_cli.errors import UsageError
    from xattn_cli.explainers.surgery import SurgeryExplainer
    from xattn_cli.models.registry import load_model

    [record] = records(surgery(files, tmp_path, "--model", "openclip:xattn-tiny-rn", "--pretrained",
                               files["rn.safetensors"]))
    assert record["status"] == "ok" and len(saved_maps(tmp_path)) == 2
    adapter = load_model("openclip:xattn-tiny-rn", str(files["rn.safetensors"]))
    with pytest.raises(UsageError, match="surgery blocks do not apply"):
        SurgeryExplainer(adapter, ["red"], ensemble=False, blocks=2, text_cache=False)
    state = adapter.model.state_dict()
    torch.save({"epoch": 1, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "rn-epoch1.pt")
    from_training = load_model("openclip:xattn-tiny-rn", str(tmp_path / "rn-epoch1.pt")).model.state_dict()
    assert all(torch.equal(from_training[key], value) for key, value in state.items())


def test_degenerate_maps_are_marked_and_counted(files, tmp_path):
    """All-zero projections: every map is constant. The table says so on the row, stderr counts them."""
    from safetensors.torch import load_file

    state = load_file(str(files["vit.safetensors"]))
    state["visual.proj"] = torch.zeros_like(state["visual.proj"])
    save_file(state, str(tmp_path / "flat.safetensors"))
    completed = xattn("surgery", files["scene.png"], "--text", "red", "--no-ensemble", "--no-text-cache",
                      "--model", "openclip:xattn-tiny-quickgelu", "--pretrained", tmp_path / "flat.safetensors",
                      "--out", tmp_path / "out", "-f", "table", env={"XATTN_TEST_ARCHS": str(files["archs"])})
    assert completed.returncode == 0 and "degenerate" in completed.stdout
    assert completed.stderr.strip().splitlines() == [
        "xattn: 1 map(s) are degenerate (constant, no signal); check the weights and tokenizer files"]


def test_openai_tag_config_sets_quickgelu_for_a_file(files, monkeypatch):
    """`--model clip --pretrained FILE` builds what open_clip builds for the alias's tag (QuickGELU for
    OpenAI's): shown on the tiny architecture, given the tag config OpenAI's ViT-B-16 has."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from xattn_cli.models.zoo import openclip_model

    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"]
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda arch, tag: {"quick_gelu": True} if tag == "openai" else real(arch, tag))
    adapter = openclip_model("xattn-tiny", str(files["vit.safetensors"]), weights_tag="openai")
    assert any(isinstance(m, QuickGELU) for m in adapter.model.modules())
    plain = openclip_model("xattn-tiny", str(files["vit.safetensors"]))
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules())


def test_checkpoint_wrappers_read_the_same_tensors(tmp_path):
    from xattn_cli.errors import UsageError
    from xattn_cli.models.checkpoints import load_state_dict

    state = {"a.weight": torch.randn(2, 3), "b": torch.randn(4)}
    layouts = {"bare.pt": state, "model.pt": {"model": state, "epoch": 1},
               "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ddp.safetensors"))
    assert load_state_dict(tmp_path / "ddp.safetensors").keys() == state.keys()
    torch.save({"epoch": 1, "note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(UsageError, match="no state dict"):
        load_state_dict(tmp_path / "empty.pt")


def test_detr_folder_with_its_image_processor(tmp_path):
    """DETR's `save_pretrained` folder with the image processor HF saves beside it: its mean and std are used."""
    import transformers

    from xattn_cli.models.registry import load_model

    _detr_model().save_pretrained(tmp_path / "detr")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    transformers.DetrImageProcessor(size={"shortest_edge": 40, "longest_edge": 48}, image_mean=mean,
                                    image_std=std).save_pretrained(tmp_path / "detr")
    adapter = load_model(f"hf:{tmp_path / 'detr'}")
    assert list(adapter.mean) == mean and list(adapter.std) == std


def test_processor_config_of_transformers_5_is_read(files):
    from xattn_cli.models.hf import image_processor_config

    assert not (files["hf-clip"] / "preprocessor_config.json").exists()
    assert image_processor_config(str(files["hf-clip"]))["crop_size"] == {"height": 32, "width": 32}


# ------------------------------------------------------------------------------------------------
# classifiers: timm files, HF folders from an offline cache
# ------------------------------------------------------------------------------------------------


def relevancy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return xattn("relevancy", *args, "-f", "jsonl", env=env, prelude="from xattn_cli.cli.app import main\nmain()\n")


def test_timm_files_with_1000_and_5_classes(files, tmp_path):
    from xattn_cli.models.registry import load_model

    assert len(load_model("timm:test_vit", str(files["timm-1000.safetensors"])).labels) == 1000
    [record] = records(relevancy(files["scene.png"], "--model", "timm:test_vit", "--pretrained", files["timm-5.pth"],
                                 "--labels", files["five.json"], "--target", "owl", "--out", tmp_path / "b"))
    assert record["targets"][0]["target"] == "owl"


def test_hf_repo_resolves_from_the_offline_cache(files, tmp_path):
    offline = {"HF_HOME": str(files["hf-home"]), "HF_HUB_OFFLINE": "1"}
    for name in ("vit", "hf:org/tiny-vit"):
        [record] = records(relevancy(files["scene.png"], "--model", name, "--out", tmp_path / name.replace(":", "-"),
                                     env=offline))
        assert record["status"] == "ok" and record["targets"][0]["target"] in ("circle", "square", "star")


def test_hf_refusals(files):
    """A repo in no cache (offline), --pretrained beside a folder, surgery on a classifier: one line each."""
    from xattn_cli.errors import UsageError
    from xattn_cli.explainers.surgery import SurgeryExplainer
    from xattn_cli.models.registry import load_model

    with pytest.raises(UsageError, match="not in the Hugging Face cache"):
        load_model("hf:org/not-cached")
    with pytest.raises(UsageError, match="pretrained weights do not apply"):
        load_model(f"hf:{files['hf-vit']}", str(files["vit.safetensors"]))
    with pytest.raises(UsageError, match=f"hf:{files['hf-vit']} has no surgery; use xattn relevancy"):
        SurgeryExplainer(load_model(f"hf:{files['hf-vit']}"), ["red"])


# ------------------------------------------------------------------------------------------------
# VQA: answer lists shipped beside the weights, tokenizer files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, labels, answer", [("lxmert", "answers.json", "blue"),
                                                    ("visualbert", "label2ans.json", "2")])
def test_vqa_answers_from_a_labels_file(files, tmp_path, family, labels, answer):
    [record] = records(relevancy(files["scene.png"], "--model", f"hf:{files[family]}", "--question",
                                 "what colour is the star ?", "--labels", files[labels], "--answer", answer,
                                 "--out", tmp_path))
    target = record["targets"][0]
    assert target["answer"] in ANSWERS and "blue" in (target["target"], target.get("answer"))
    assert [token["token"] for token in target["tokens"]][:3] == ["what", "colour", "is"]  # not [UNK]


def test_labels_files(files, tmp_path):
    """Lists, index → name and name → index maps, text lines; the count must match the model's head."""
    from xattn_cli.errors import UsageError
    from xattn_cli.models.labels import apply_labels, read_labels
    from xattn_cli.models.registry import load_model

    (tmp_path / "ans2label.json").write_text(json.dumps({name: i for i, name in enumerate(ANSWERS)}))
    (tmp_path / "answers.txt").write_text("\n".join(ANSWERS) + "\n")
    for name in ("answers.json", "label2ans.json"):
        assert read_labels(files[name]) == ANSWERS
    assert read_labels(tmp_path / "ans2label.json") == read_labels(tmp_path / "answers.txt") == ANSWERS
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(UsageError, match="without gaps"):
        read_labels(tmp_path / "gap.json")
    with pytest.raises(UsageError, match="names 5 labels; timm:test_vit has 1000"):
        apply_labels(load_model("timm:test_vit", str(files["timm-1000.safetensors"])), files["five.json"])
    with pytest.raises(UsageError, match="labels file is for classifiers and VQA models"):
        apply_labels(load_model(f"hf:{files['hf-clip']}"), files["five.json"])


# ------------------------------------------------------------------------------------------------
# an unexpected exception
# ------------------------------------------------------------------------------------------------


def test_an_unexpected_exception_is_one_stderr_line(files, tmp_path):
    prelude = ("import xattn_cli.models.registry as registry\n"
               "def broken(*args, **kwargs):\n    raise RuntimeError('injected\\nsecond line')\n"
               "registry.load_model = broken\n" + PRELUDE)
    completed = xattn("surgery", files["scene.png"], "--text", "red", "--out", tmp_path, prelude=prelude)
    assert completed.returncode == 1
    assert completed.stderr.splitlines() == ["xattn: internal error: RuntimeError: injected"]


def test_options_that_do_not_apply_are_usage_errors(files):
    """--precision on a region model (it runs in fp32) and --labels on a detector: refused, not ignored."""
    from xattn_cli.errors import UsageError
    from xattn_cli.explainers import build_relevancy
    from xattn_cli.models.labels import apply_labels
    from xattn_cli.models.registry import load_model

    lxmert = load_model(f"hf:{files['lxmert']}")
    with pytest.raises(UsageError, match="precision"):
        build_relevancy(lxmert, method="chefer", questions=["what colour is the star ?"], precision="bf16")
    with pytest.raises(UsageError, match="labels file is for classifiers and VQA models"):
        apply_labels(load_model("shapes-detr"), files["five.json"])
