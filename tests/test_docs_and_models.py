"""What the README and `xattn models` tell a new user: links that resolve inside the project, and whether a
model's weights are on this machine."""
from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from xattn_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_only_files_of_the_project() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../" not in readme and "shared/reference" not in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        assert not re.match(r"[a-z]+:", target), target  # no web links either: the page must stand alone
        assert (ROOT / target).exists(), target


def test_models_says_whether_weights_are_here(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    snapshot = tmp_path / "models--google--vit-base-patch16-224" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    result = CliRunner().invoke(app, ["models", "-f", "json"])
    assert result.exit_code == 0, result.output
    weights = {row["name"]: row["weights"] for row in json.loads(result.stdout)}
    assert weights["shapes-clip"] == "bundled"
    assert weights["vit"] == "in the Hugging Face cache"
    assert weights["clip"] == weights["detr"] == "not here (downloads on first use)"
    assert weights["openclip:..."] == "named by the argument or --pretrained"
