"""Bad inputs, crashes and unsafe checkpoints, through the real CLI in subprocesses (issue: robustness)."""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TEXTS = ["--text", "a red circle", "--text", "a blue star"]
DROP_ROOT_READ = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]


def xattn(args: list[str], **kwargs) -> list[str]:
    command = [sys.executable, "-m", "xattn_cli", *args]
    # Root reads any file; without these two capabilities it obeys permission bits like a user.
    return DROP_ROOT_READ + command if os.geteuid() == 0 else command


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def scene(seed: int) -> Image.Image:
    from xattn_cli.world.shapes import scene_at

    return scene_at(4, seed, size=80, n_objects=2).image


def build_corpus(folder: Path) -> dict[str, str | None]:
    """Each bad or unusual input → the error type expected in its record (None: an ok record)."""
    folder.mkdir(parents=True)
    expected: dict[str, str | None] = {}

    def add(name: str, outcome: str | None, writer) -> None:
        writer(folder / name)
        expected[name] = outcome

    good = scene(0)
    png = io.BytesIO(); good.save(png, "PNG")
    jpeg = io.BytesIO(); good.save(jpeg, "JPEG")
    add("zero-byte.png", "UnreadableImage", lambda p: p.write_bytes(b""))
    add("truncated.png", "UnreadableImage", lambda p: p.write_bytes(png.getvalue()[: len(png.getvalue()) // 2]))
    add("truncated.jpg", "UnreadableImage", lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]))
    add("text.jpg", "UnreadableImage", lambda p: p.write_text("this is not a picture\n"))
    add("cmyk.jpg", None, lambda p: good.convert("CMYK").save(p, "JPEG"))
    add("sixteen-bit.png", None, lambda p: Image.fromarray(
        (np.asarray(good.convert("L")).astype(np.uint16) * 257)).save(p))
    add("palette-alpha.png", None, lambda p: good.convert("P").save(p, transparency=0))
    add("la.png", None, lambda p: good.convert("LA").save(p))
    exif = Image.Exif(); exif[0x0112] = 6
    add("rotated.jpg", None, lambda p: good.resize((80, 50)).save(p, "JPEG", exif=exif))
    add("one-pixel.png", None, lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p))
    add("huge.png", "ImageTooLarge", lambda p: Image.new("RGB", (300, 300)).save(p))
    add("animated.gif", None, lambda p: good.save(p, save_all=True, append_images=[scene(1)], duration=100))
    add("scene.tiff", None, lambda p: good.save(p, "TIFF"))
    add("scene.webp", None, lambda p: good.save(p, "WEBP"))
    add("ünï cödé with spaces.png", None, lambda p: good.save(p))
    add("unreadable.png", "UnreadableImage", lambda p: (good.save(p), p.chmod(0)))
    (folder / "notes.txt").write_text("skipped: not an image extension")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return expected


def test_every_corpus_item_gets_a_result_or_an_error_record(tmp_path):
    corpus = tmp_path / "bad inputs ü"
    expected = build_corpus(corpus)
    out = tmp_path / "out"
    completed = subprocess.run(xattn(["surgery", str(corpus), *TEXTS, "--out", str(out), "--max-pixels", "40000",
                                      "--format", "jsonl", "--save-maps"]),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 1, completed.stderr  # some items failed
    assert "Traceback" not in completed.stderr
    by_name = {Path(r["image"]).name: r for r in records(out)}
    assert set(by_name) == set(expected)  # the folder walk skipped notes.txt and ended the symlink loop
    for name, error_type in expected.items():
        record = by_name[name]
        if error_type is None:
            assert record["status"] == "ok", (name, record)
            for target in record["targets"]:
                assert np.load(target["map"]).shape == tuple(reversed(record["size"]))
        else:
            assert record["status"] == "error" and record["error"]["type"] == error_type, (name, record)
            assert record["error"]["message"] and "\n" not in record["error"]["message"]
    assert by_name["rotated.jpg"]["size"] == [50, 80]  # EXIF orientation 6 applied
    assert by_name["one-pixel.png"]["size"] == [1, 1]


def test_a_path_that_vanishes_mid_run_gets_an_error_record(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(12):
        paths.append(folder / f"{i:02d}.png")
        scene(i).save(paths[-1])
    out = tmp_path / "out"
    process = subprocess.Popen(xattn(["surgery", "-", *TEXTS, "--out", str(out), "--batch-size", "1", "-f", "jsonl"]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdin.write("\n".join(map(str, paths)) + "\n")
    process.stdin.close()
    first = process.stdout.readline()  # the first record is out: the last image is not decoded yet
    assert json.loads(first)["status"] == "ok"
    paths[-1].unlink()
    rest, stderr = process.stdout.read(), process.stderr.read()  # stderr holds a line or two at most
    assert process.wait(timeout=300) == 1 and "Traceback" not in stderr
    last = json.loads(rest.splitlines()[-1])
    assert last["image"] == str(paths[-1]) and last["error"]["type"] == "FileNotFound"


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--text", ""], "--text"),
    (["--size", "12x"], "bad --size"),
    (["--pretrained", "missing.safetensors"], "checkpoint not found"),
    (["--device", "cuda"], "CUDA"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    image = tmp_path / "a.png"
    scene(0).save(image)
    extra = [] if "--text" in args else TEXTS
    completed = subprocess.run(xattn(["surgery", str(image), *extra, *args, "--out", str(tmp_path / "o")]),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and len(completed.stderr.strip().splitlines()) == 1


def test_checkpoint_that_does_not_fit_names_the_first_bad_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from xattn_cli.config import load_config, project_path

    state = load_file(str(project_path(load_config("shapes-clip")["weights"])))
    del state["visual.proj"]
    checkpoint = tmp_path / "partial.safetensors"
    save_file(state, str(checkpoint))
    image = tmp_path / "a.png"
    scene(0).save(image)
    completed = subprocess.run(xattn(["surgery", str(image), *TEXTS, "--pretrained", str(checkpoint),
                                      "--out", str(tmp_path / "o")]), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "visual.proj" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


class _WritesAFile:
    """A harmless pickle payload: unpickling it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def test_pickle_checkpoints_need_trust(tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "evil.pt"
    with open(checkpoint, "wb") as handle:
        pickle.dump({"visual.proj": _WritesAFile(str(marker))}, handle)
    image = tmp_path / "a.png"
    scene(0).save(image)
    base = ["surgery", str(image), *TEXTS, "--pretrained", str(checkpoint), "--out", str(tmp_path / "o")]
    refused = subprocess.run(xattn(base), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr
    assert not marker.exists()
    trusted = subprocess.run(xattn(base + ["--trust-checkpoint"]), capture_output=True, text=True, timeout=300)
    assert marker.exists()  # with trust the pickle ran; the checkpoint still does not fit
    assert trusted.returncode == 2 and "Traceback" not in trusted.stderr


def test_non_finite_model_outputs_are_error_records(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from xattn_cli.config import load_config, project_path

    state = load_file(str(project_path(load_config("shapes-clip")["weights"])))
    state["visual.proj"] = torch.full_like(state["visual.proj"], float("nan"))
    checkpoint = tmp_path / "nan.safetensors"
    save_file(state, str(checkpoint))
    image = tmp_path / "a.png"
    scene(0).save(image)
    completed = subprocess.run(xattn(["surgery", str(image), *TEXTS, "--pretrained", str(checkpoint),
                                      "--out", str(tmp_path / "o"), "-f", "jsonl"]),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    (record,) = records(tmp_path / "o")
    assert record["status"] == "error" and record["error"]["type"] == "NonFiniteOutput"


def test_hostile_target_names_stay_inside_out(tmp_path):
    image = tmp_path / "a.png"
    scene(0).save(image)
    out = tmp_path / "deep" / "out"
    completed = subprocess.run(xattn(["surgery", str(image), "--text", "../../x", "--text", "/etc/passwd",
                                      "--out", str(out), "-f", "jsonl"]), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    for target in records(out)[0]["targets"]:
        assert Path(target["overlay"]).resolve().parent == out.resolve()
    written = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert written == sorted([Path(t["overlay"]).name for t in records(out)[0]["targets"]] + ["a.png"])


def _start_batch(folder: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(xattn(["surgery", str(folder), *TEXTS, "--out", str(out), "--save-maps",
                                   "--batch-size", "4", "-f", "jsonl", *extra]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "results.jsonl").exists() and len((out / "results.jsonl").read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not produce records in time")


@pytest.fixture
def sixty_scenes(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(60):
        scene(i).save(folder / f"{i:02d}.png")
    return folder


def test_sigkill_then_resume_gives_exactly_one_ok_record_per_image(sixty_scenes, tmp_path):
    folder = sixty_scenes
    out = tmp_path / "out"
    process = _start_batch(folder, out)
    _wait_for_records(out, 10, process)
    process.kill()
    process.communicate(timeout=60)  # hangs if a decoding worker outlives the run and holds its stdout
    before = [r["image"] for r in records(out)]
    assert 10 <= len(before) < 60
    resumed = _start_batch(folder, out, "--resume")
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    after = [json.loads(line)["image"] for line in stdout.splitlines()]
    assert not set(after) & set(before)  # nothing finished was processed twice
    final = records(out)
    assert sorted(r["image"] for r in final) == sorted(str(p) for p in folder.glob("*.png"))
    for record in final:
        assert record["status"] == "ok"
        for target in record["targets"]:
            assert Image.open(target["overlay"]).size == (80, 80)
            assert np.load(target["map"]).shape == (80, 80)
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_flushes_and_exits_130(sixty_scenes, tmp_path):
    out = tmp_path / "out"
    process = _start_batch(sixty_scenes, out)
    _wait_for_records(out, 4, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert all(r["status"] == "ok" for r in records(out))  # every line parses: nothing half-written
