"""`xattn report`: the HTML page of a results folder and a bench run, checked as text and in headless Chromium."""
from __future__ import annotations

import os
import re
import shutil

import pytest
from typer.testing import CliRunner

from xattn_cli.cli.app import app
from xattn_cli.world.shapes import scene_at

runner = CliRunner()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A relevancy run on two scenes and an unreadable file, and a small bench run, in one folder."""
    root = tmp_path_factory.mktemp("report")
    images = root / "imgs"
    images.mkdir()
    for index in range(2):
        scene_at(6, index, size=64, n_objects=2).image.save(images / f"scene{index}.png")
    (images / "broken.png").write_text("not an image")
    out = root / "out"
    explained = runner.invoke(app, ["relevancy", str(images), "--model", "shapes-clip", "--text", "a red circle",
                                    "--text", "a blue star", "--out", str(out), "--format", "json", "--device", "cpu"])
    assert explained.exit_code == 1, explained.output  # the broken file fails, the others are explained
    benched = runner.invoke(app, ["bench", "quality", "--scenes", "1", "--models", "shapes-vit", "--methods",
                                  "raw,centre", "--sanity", "--sanity-scenes", "1", "--resamples", "100",
                                  "--device", "cpu", "--json", str(out / "quality.json"), "-q"])
    assert benched.exit_code == 0, benched.output
    written = runner.invoke(app, ["report", str(out)])
    assert written.exit_code == 0, written.output
    assert written.stdout.strip() == str(out / "report.html")
    return out


def test_page_shows_every_target_and_error_and_is_self_contained(run_folder):
    page = (run_folder / "report.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    assert page.count("scene0.png</td>") == 2 and page.count("scene1.png</td>") == 2  # two targets each
    assert "UnreadableImage" in page
    assert '<span class="token"' in page and ">circle</span>" in page
    assert "Faithfulness benchmark: quality.json" in page and "FLAGGED" in page  # centre is flagged


def test_a_folder_of_several_runs_shows_every_run_and_embeds_each_picture_once(tmp_path):
    image, out = tmp_path / "scene.png", tmp_path / "out"
    scene_at(6, 0, size=64, n_objects=2).image.save(image)
    for command in (["relevancy", "--method", "chefer"], ["relevancy", "--method", "raw"], ["surgery"],
                    ["surgery"]):  # the second surgery run retries the same image: only its latest record counts
        ran = runner.invoke(app, [command[0], str(image), "--model", "shapes-clip", "--text", "a red circle",
                                  *command[1:], "--out", str(out), "-f", "jsonl"])
        assert ran.exit_code == 0, ran.output
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    for run in ("shapes-clip · chefer", "shapes-clip · raw", "shapes-clip · surgery"):
        assert page.count(f"<td>{run}</td>") == 1, run
    assert "3 records of 1 images by 3 model · method run(s)" in page
    picture = re.findall(r"\.picture-0 \{ background-image: url\((data:image/png;base64,[^)]*)\)", page)
    assert len(picture) == 1 and page.count(picture[0]) == 1
    assert page.count('class="thumb picture-0"') == 3


def test_missing_or_empty_folder_is_one_line_and_exit_2(tmp_path):
    for folder, message in ((tmp_path / "missing", "no such folder"), (tmp_path, "nothing to report")):
        result = runner.invoke(app, ["report", str(folder)])
        assert result.exit_code == 2
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, text", [
    ("quality.json", '{"benchmark": "quality", "rows": [{"model": "m"}]}'),
    ("results.jsonl", '{"image": "a.png", "status": "ok", "targets": [{"overlay": "a__x.png"}]}\n'),
])
def test_files_not_laid_out_as_xattn_writes_them_are_one_line_and_exit_2(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert name in line and "not laid out as xattn writes it" in line


def browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if chromium and driver:
        return chromium, driver
    if os.environ.get("XATTN_REQUIRE_BROWSER") == "1":
        pytest.fail("XATTN_REQUIRE_BROWSER=1 but chromium, chromedriver or selenium is missing")
    pytest.skip("headless Chromium (Debian chromium + chromium-driver) and selenium are needed")


def _started(start, attempts: int = 3):
    """A Chromium session; its start is retried, since on a loaded machine Chromium can miss chromedriver's
    start-up deadline ("DevToolsActivePort file doesn't exist"), which says nothing about the report."""
    from selenium.common.exceptions import SessionNotCreatedException

    for attempt in range(attempts):
        try:
            return start()
        except SessionNotCreatedException:
            if attempt == attempts - 1:
                raise


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = _started(lambda: webdriver.Chrome(service=Service(driver_path), options=options))
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_headless_chromium_and_sorts_by_score(run_folder, browser):
    from selenium.webdriver.common.by import By

    browser.get((run_folder / "report.html").as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    widths = browser.execute_script("return Array.from(document.images, (image) => image.naturalWidth)")
    assert len(widths) >= 5 and all(width > 0 for width in widths)  # plot + 4 overlays
    pictures = browser.execute_script("return Array.from(document.querySelectorAll('span.thumb'), "
                                      "(span) => [getComputedStyle(span).backgroundImage, span.clientHeight])")
    assert len(pictures) == 4  # two scenes × two targets; each original embedded once, shown on every row
    assert all(image.startswith('url("data:image/png;base64,') and height > 0 for image, height in pictures)
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []

    gallery = browser.find_elements(By.CSS_SELECTOR, "table.sortable")[-1]
    header = next(th for th in gallery.find_elements(By.TAG_NAME, "th") if th.text.startswith("score"))
    column = [th.text for th in gallery.find_elements(By.TAG_NAME, "th")].index(header.text)

    def scores():
        cells = [row.find_elements(By.TAG_NAME, "td")[column] for row in gallery.find_elements(By.CSS_SELECTOR, "tbody tr")]
        return [float(cell.get_attribute("data-value") or "-inf") for cell in cells]

    header.click()
    descending = scores()
    assert descending == sorted(descending, reverse=True) and len(descending) == 5
    assert descending[-1] == float("-inf")  # the error row has no score
    header.click()
    assert scores() == sorted(descending)
