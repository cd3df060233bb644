"""Installable anywhere: a wheel of the repository, installed into a fresh virtualenv outside the source
tree, runs the README demo and a bundled relevancy model from a temporary folder, reading its configs and
weights from the installed package.

The fresh virtualenv sees this interpreter's third-party packages (torch is large) through a `.pth` line,
which does not run the editable install's import hook: only the wheel's `xattn_cli` is importable there.
The wheel is built from a copy of the tree, so no build/ or egg-info folder lands in the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from xattn_cli.models.registry import list_models

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "xattn-out")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"{command[:4]} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    return completed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh virtualenv, an environment that runs it, a working folder outside the source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(root / "dist"),
         str(source)], cwd=root)
    (wheel,) = (root / "dist").glob("xattn_cli-*.whl")

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root).stdout.strip())
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "shared_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(shared)))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        cwd=root)

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
               OMP_NUM_THREADS="1")
    work = root / "work"
    work.mkdir()
    shutil.copy(REPO / "assets" / "images" / "scene-02.png", work / "scene-02.png")
    return env_dir, env, work


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_package_and_its_data_come_from_the_fresh_virtualenv(installed):
    env_dir, env, work = installed
    probe = ("import xattn_cli; from xattn_cli.config import data_path; "
             "print(xattn_cli.__file__); print(data_path('assets/weights/shapes-clip.safetensors'))")
    package, weights = run([str(env_dir / "bin" / "python"), "-c", probe], cwd=work, env=env).stdout.split()
    assert Path(package).is_relative_to(env_dir), package
    assert Path(weights).is_relative_to(env_dir) and Path(weights).is_file(), weights


@pytest.mark.slow
def test_every_bundled_model_finds_its_weights_in_the_wheel(installed):
    env_dir, env, work = installed
    listed = run(["xattn", "models", "--format", "jsonl"], cwd=work, env=env).stdout.splitlines()
    weights = {row["name"]: row["weights"] for row in map(json.loads, listed) if row["bundled"]}
    bundled = {spec.name for spec in list_models() if spec.bundled}
    assert bundled and set(weights) == bundled
    assert set(weights.values()) == {"bundled"}, weights


@pytest.mark.slow
def test_readme_demo_runs_from_the_wheel(installed):
    env_dir, env, work = installed
    texts = ["a red triangle", "a purple cross"]
    run(["xattn", "surgery", "scene-02.png", "--text", texts[0], "--text", texts[1]], cwd=work, env=env)
    (record,) = records(work / "xattn-out")
    assert record["status"] == "ok" and [target["target"] for target in record["targets"]] == texts
    assert all((work / target["overlay"]).is_file() for target in record["targets"])


@pytest.mark.slow
def test_bundled_vqa_model_runs_from_the_wheel(installed):
    env_dir, env, work = installed
    out = work / "vqa-out"
    run(["xattn", "relevancy", "scene-02.png", "--model", "shapes-lxmert", "--question",
         "what colour is the triangle?", "--out", str(out)], cwd=work, env=env)
    (record,) = records(out)
    (target,) = record["targets"]
    assert record["status"] == "ok" and (work / target["overlay"]).is_file()
