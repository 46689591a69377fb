"""The editing page (app.py) in a real browser: Playwright drives Debian's Chromium against `python app.py` on
localhost. Run with `make test-browser` (it installs both; under a minute after that); left out of `make test`.

The page runs the cpu preset with an adapter this test teaches the request it sends (a few supervised steps on
that request alone), so the plan the page must show is known: the test is about the page, not the planner. It
saves the screenshot the README shows, docs/app.jpg."""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser
ROOT = Path(__file__).parent.parent
REQUEST = "make it black and white and blur the background"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
# No sandbox (root in a container), and none of Chromium's calls home, which a closed network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from data import builtin_image
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    builtin_image("astronaut", 512).save(path)
    return path


@pytest.fixture(scope="module")
def taught(photo, tmp_path_factory):
    """A cpu adapter that writes REQUEST's plan: 12 supervised steps on it, with the photo's perception text."""
    import coldstart
    import config
    import edit
    from planner import load_planner
    planner = load_planner("cpu")
    sample = dict(instruction=REQUEST, description=edit.describe(Image.open(photo).convert("RGB")),
                  action=["grayscale", "blur"], subject=["whole image", "background"], goal=["full", "strongly"])
    coldstart.sft(planner, [sample], config.Config(preset="cpu", sft_steps=12, sft_batch=1, sft_micro=1))
    folder = tmp_path_factory.mktemp("runs") / "taught" / "adapter"
    planner.policy.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(taught, tmp_path_factory):
    """`python app.py` on a free port; its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--adapter", str(taught), "--port", str(port)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="make test-browser installs Playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium: make test-browser installs Debian's package chromium (or set CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def picture(page, selector):
    """The image a Gradio image component shows, as an array, fetched as the browser would."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")).astype(int)


def table(page, selector):
    """The rows of a Gradio table as the browser shows them (its body cells are ARIA grid cells)."""
    cells = page.locator(f"{selector} [role=gridcell]")
    rows = {}
    for i in range(cells.count()):
        cell = cells.nth(i)
        rows.setdefault(int(cell.get_attribute("data-row")), []).append(cell.inner_text().strip())
    return [rows[k] for k in sorted(rows)]


def wait_status(page, *words, timeout=180_000):
    """The status line once it says one of `words`."""
    page.wait_for_function("words => words.some(w => (document.querySelector('#status')?.innerText || '')"
                           ".includes(w))", arg=list(words), timeout=timeout)
    return page.inner_text("#status")


def test_the_page_edits_a_photo_and_refuses_a_text_file(browser, server, photo, tmp_path):  # no browser: no work
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    page.set_input_files("#upload input[type=file]", str(photo))
    page.wait_for_selector("#before img")  # the photo shows as soon as it is uploaded
    page.fill("#request textarea", REQUEST)
    page.click("#run")
    status = wait_status(page, "Done in", "error:")
    assert status.startswith("Done in") and "2 step(s)" in status, status
    assert table(page, "#plan") == [["grayscale", "whole image", "full"], ["blur", "background", "strongly"]]
    assert [row[1] for row in table(page, "#order")] == ["grayscale the whole image", "blur the background: strongly"]
    assert page.locator("#masks img").count() == 2  # both steps' regions drawn
    before, after = picture(page, "#before"), picture(page, "#after")
    assert before.shape == after.shape == (512, 512, 3)
    assert np.abs(before - after).mean() > 5, "the after image should differ from the before image"
    taught_plan = page.input_value("#raw textarea")
    assert taught_plan.startswith("<action>grayscale; blur</action>"), taught_plan
    links = {Path(a.get_attribute("href")).name: a.get_attribute("href") for a in page.locator("#downloads a").all()}
    assert set(links) == {"astronaut_edited.png", "astronaut_edited.json"}, links
    saved = Image.open(io.BytesIO(page.request.get(links["astronaut_edited.png"]).body()))
    assert np.array_equal(np.asarray(saved.convert("RGB")), after)  # the download is the full image
    page.screenshot(path=str(ROOT / "docs" / "app.jpg"), full_page=True, type="jpeg", quality=80)

    page.click("#planner-choice label:has-text('base')")  # the switch: the same photo and request, untaught
    page.click("#run")
    assert "planner: cpu, base model" in wait_status(page, "base model", "error:")
    assert page.input_value("#raw textarea") != taught_plan

    text = tmp_path / "notes.txt"
    text.write_text("this is not a photo")
    page.click("#upload button[aria-label=Clear]")
    page.set_input_files("#upload input[type=file]", str(text))
    assert "notes.txt is not an image PIL can read" in wait_status(page, "error:")  # said at once, on upload
    page.click("#run")
    page.wait_for_function("() => !document.querySelector('#after img')")  # the last result is cleared
    assert wait_status(page, "error:") == "error: notes.txt is not an image PIL can read"
