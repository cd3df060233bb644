"""Getting started fast: a model built from a weights file skips random init (and open_clip's untrue "No
pretrained weights loaded"), a model without weights says so in one line, and --resume with nothing left to
do loads no model."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY_VIT

ARCH = "xattn-tiny-getting-started"


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """A tiny ViT architecture open_clip lists by name (`openclip:ARCH` needs one)."""
    import open_clip

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{ARCH}.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(folder)
    return ARCH


@pytest.fixture
def weights_file(tiny_arch: str, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(5)
    reference = open_clip.create_model(tiny_arch).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, str(path))
    return path, reference


def test_a_weights_file_skips_random_init_and_the_untrue_warning(weights_file, monkeypatch, caplog) -> None:
    from xattn_cli.models.registry import load_model

    path, reference = weights_file
    calls = []
    original = torch.nn.init.kaiming_uniform_
    spy = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]  # noqa: E731
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random weights" warning either
        adapter = load_model(f"openclip:{ARCH}", str(path))
    assert calls == []  # every nn.Linear would have called it
    assert torch.nn.init.kaiming_uniform_ is spy  # restored
    assert not [record for record in caplog.records if "No pretrained weights" in record.getMessage()]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.model.encode_image(pixels), reference.encode_image(pixels))
    for name, tensor in adapter.model.state_dict().items():  # buffers built in __init__ included
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=0, atol=0)


def test_random_weights_are_said_in_one_warning(tiny_arch: str) -> None:
    from xattn_cli.models.registry import load_model

    with pytest.warns(UserWarning, match=f"openclip:{ARCH} runs with random weights") as caught:
        load_model(f"openclip:{ARCH}")
    assert all("\n" not in str(warning.message) for warning in caught)


def test_resume_with_nothing_left_loads_no_model(tmp_path: Path) -> None:
    from xattn_cli.cli.app import app
    from xattn_cli.world.shapes import scene_at

    image, out = tmp_path / "scene.png", tmp_path / "out"
    scene_at(3, 0, size=64, n_objects=2).image.save(image)
    first = CliRunner().invoke(app, ["surgery", str(image), "--text", "a red circle", "-o", str(out), "-f", "jsonl"])
    assert first.exit_code == 0, first.output
    # a model that cannot load: any attempt to build it is a usage error (exit 2)
    again = ["surgery", str(image), "--text", "a red circle", "-o", str(out), "-f", "json", "--resume",
             "--pretrained", str(tmp_path / "missing.safetensors")]
    resumed = CliRunner().invoke(app, again)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout) == []
    assert "skipped 1 finished image(s)" in resumed.stderr
    (out / "results.jsonl").write_text("")  # now there is work left, so the model is loaded and fails
    assert CliRunner().invoke(app, again).exit_code == 2
