"""The editing page's handlers (app.py), without a browser: tables, mask drawings, messages, a real request on the
cpu preset. tests/test_browser.py drives the page itself in Chromium (`make test-browser`)."""
import json

import numpy as np
import pytest
from PIL import Image

import app
import edit


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A cpu-preset page with no trained adapter (an empty runs folder): the base planner, loaded once."""
    root = tmp_path_factory.mktemp("runs")
    return app.Page("cpu", root=str(root), out_dir=tmp_path_factory.mktemp("out"))


def test_plan_and_order_rows():
    plan = {"action": ["grayscale", "blur"], "subject": ["whole image", "background"], "goal": ["full", "strongly"]}
    assert app.plan_rows(plan) == [["grayscale", "whole image", "full"], ["blur", "background", "strongly"]]
    steps = [{"step": 1, "text": "blur the background", "agent": "background", "region": "around the person",
              "area": 0.437, "seconds": 0.04},
             {"step": 2, "text": "sparkle the cat", "seconds": 0.0, "error": "EditError: no action 'sparkle'"}]
    rows = app.order_rows(steps)
    assert rows[0] == [1, "blur the background", "background", "around the person", "44%", 0.04, ""]
    assert rows[1] == [2, "sparkle the cat", "", "", "", 0.0, "EditError: no action 'sparkle'"]
    assert len(app.ORDER_HEADERS) == len(rows[0])


def test_overlay_tints_the_mask_only():
    image = np.full((4, 6, 3), 100, np.uint8)
    mask = np.zeros((4, 6), np.float32)
    mask[1:3, 2:5] = 1.0
    mask[0, 0] = 0.5
    out = np.asarray(app.overlay(image, mask)).astype(float)
    assert out.shape == (4, 6, 3)
    assert (out[mask == 0] == 100).all()
    assert np.allclose(out[1, 2], 100 * 0.45 + app.TINT * 0.55, atol=0.5)
    assert np.allclose(out[0, 0], 100 * (1 - 0.275) + app.TINT * 0.275, atol=0.5)


def test_upload_errors_name_the_file_not_the_servers_copy(tmp_path):
    text = tmp_path / "upload-7f3a" / "notes.txt"
    text.parent.mkdir()
    text.write_text("not a picture")
    with pytest.raises(app.PageError) as e:
        app.read_upload(text)
    assert str(e.value) == "notes.txt is not an image PIL can read"  # edit.py's message, the file by its name
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(app.PageError, match=r"^empty.png is empty \(0 bytes\), not an image$"):
        app.read_upload(empty)
    cut = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(cut)
    cut.write_bytes(cut.read_bytes()[:60])
    with pytest.raises(app.PageError, match=r"^cut.png: cannot read image \(truncated or corrupt\)"):
        app.read_upload(cut)


def test_upload_too_large(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)  # does not compress: 1.8 MB
    Image.fromarray(noise).save(big)
    monkeypatch.setattr(app, "MAX_BYTES", 2**20)
    with pytest.raises(app.PageError, match=r"^big.png is too large \(2 MB\); the page takes images up to 1 MB"):
        app.read_upload(big)
    monkeypatch.setattr(app, "MAX_BYTES", 2 * 2**20)
    assert app.read_upload(big)[0].size == (800, 800)


def test_request_errors_are_edit_pys_messages(tmp_path):
    page = app.Page("cpu", root=str(tmp_path / "runs"), out_dir=tmp_path)
    with pytest.raises(app.PageError) as e:
        page.submit(None, "astronaut", "   ", "base")
    assert str(e.value) == 'the instruction is empty; say what to change, e.g. "make the sky bluer"'
    with pytest.raises(app.PageError, match="has no words"):
        page.submit(None, "astronaut", "?!", "base")
    with pytest.raises(app.PageError, match="^no image: upload a photo or pick a built-in one$"):
        page.submit(None, None, "blur it", "base")
    with pytest.raises(app.PageError, match="unknown built-in photo 'mars'"):
        page.submit(None, "mars", "blur it", "base")
    with pytest.raises(app.PageError, match=r"^no trained cpu adapter under .*runs.*/ yet: train one with `make"):
        page.submit(None, "astronaut", "blur it", "newest trained")
    with pytest.raises(app.PageError, match="^name the adapter folder"):
        page.submit(None, "astronaut", "blur it", "chosen adapter", " ")
    with pytest.raises(app.PageError, match=f"^{tmp_path} is not an adapter folder"):
        page.submit(None, "astronaut", "blur it", "chosen adapter", str(tmp_path))
    run = tmp_path / "runs" / "r1"
    (run / "adapter").mkdir(parents=True)
    (run / "config.json").write_text('{"preset": "cpu"}')
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(app.PageError, match=r"adapter_model.safetensors is damaged, not a safetensors file"):
        page.submit(None, "astronaut", "blur it", "newest trained")
    (run / "config.json").write_text("{not json")
    with pytest.raises(app.PageError, match=r"config.json is not valid JSON"):  # edit.py's exit, not the server's
        page.submit(None, "astronaut", "blur it", "newest trained")
    assert page.planners == {}  # every check ran before any planner loaded


def test_respond_shows_messages_never_a_trace(page, tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    out = app.respond(page, str(text), None, "make it black and white", "base", "")
    assert out[0] == "**error:** notes.txt is not an image PIL can read" and out[1:4] == [None, None, ""]
    assert app.preview(page, str(text), None) == ["**error:** notes.txt is not an image PIL can read", None, None]

    def broken(*a, **k):
        raise RuntimeError("the editor fell over")
    monkeypatch.setattr(page, "submit", broken)
    out = app.respond(page, None, "astronaut", "blur it", "base", "")
    assert out[0] == "**error:** the request failed: RuntimeError: the editor fell over"
    assert out[1:] == [None, None, "", [], [], [], None]


def test_a_request_on_the_cpu_preset(page):
    """The base planner (grammar-constrained) on a built-in photo: a real plan, real masks, real edits, files."""
    r = page.submit(None, "astronaut", "make it black and white and blur the background", "base")
    before, after = np.asarray(r["before"]), np.asarray(r["after"])
    assert before.shape == after.shape == (512, 512, 3)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 1  # the pixels changed
    record = json.loads(open(r["files"][1]).read())
    assert r["planner_output"] == record["planner_output"]
    assert r["plan"] == app.plan_rows(record["plan"]) and len(r["plan"]) >= 1
    assert r["order"] == app.order_rows(record["steps"])
    found = [s for s in record["steps"] if "area" in s]
    assert len(r["masks"]) == len(found)  # one drawing per step whose region agent ran
    for (pic, caption), s in zip(r["masks"], found):
        assert pic.size == (512, 512) and caption == f"{s['step']}. {s['text']} | {s['region']}"
    with Image.open(r["files"][0]) as saved:
        assert saved.size == (512, 512) and np.array_equal(np.asarray(saved.convert("RGB")), after)
    assert r["files"][0].endswith("astronaut_edited.png") and record["preset"] == "cpu" and record["adapter"] is None
    assert r["status"].startswith("Done in ") and "planner: cpu, base model" in r["status"]
    assert list(page.planners) == ["base"]  # loaded once, kept for the next request


def test_an_upload_is_edited_at_full_resolution(page, tmp_path):
    """Regions are found on a 512-pixel copy; the edit, the after image and the download are the upload's size."""
    from data import builtin_image
    path = tmp_path / "wide.jpg"
    builtin_image("coffee", 1200).resize((1600, 1200)).save(path)
    r = page.submit(str(path), None, "make it brighter", "base")
    assert r["before"].size == (1600, 1200) and max(r["after"].size) > 512
    with Image.open(r["files"][0]) as saved:
        assert saved.size == r["after"].size and np.array_equal(np.asarray(saved), np.asarray(r["after"]))
    assert r["files"][0].endswith("wide_edited.png")


@pytest.mark.parametrize("preset", ["tiny", "tiny_vl"])
def test_a_plan_that_does_not_parse_shows_the_log(preset, tmp_path):
    """A random tiny planner writes no plan: the message says so, with what the planner wrote. tiny_vl loads the
    page's planner as gpu24 does (a Qwen2.5-VL that reads the photo, no perception text), on a tiny model."""
    tiny = app.Page(preset, root=str(tmp_path), out_dir=tmp_path)
    with pytest.raises(app.PageError) as e:
        tiny.submit(None, "chelsea", "blur the cat", "base")
    head, _, log = str(e.value).partition("\n\n")
    assert head.startswith("the planner's output does not follow the <action><subject><goal> format")
    assert log.startswith("planner output: ")
    assert app.error_text(e.value).startswith("**error:** the planner's output") and "```\nplanner output:" in \
        app.error_text(e.value)


def test_gpu_agents_keep_no_planner(tmp_path, monkeypatch):
    """The memory plan: with a GPU editor the page keeps no planner; the agents of the last request leave before a
    planner loads, and the planner is gone (garbage) by the time the region agents and the editor run."""
    import gc
    import weakref

    import agents
    page = app.Page("tiny", editor="kontext", root=str(tmp_path), out_dir=tmp_path)
    assert page.keep == 0 and page.chosen["editor"] == "kontext"
    assert app.Page("cpu", root=str(tmp_path)).keep == 2
    unloads, refs, alive = [], [], []
    monkeypatch.setattr(agents, "unload", lambda: unloads.append(1))
    load = edit.load_planner

    plan = "<action>blur</action><subject>background</subject><goal>strongly</goal>"

    def planner_seen(*a, **k):  # the tiny planner, answering a fixed plan; the weakref tells when it is freed
        real = load(*a, **k)
        write = lambda x, d, im: (real, plan)[1]  # noqa: E731 it holds the real planner
        refs.append(weakref.ref(write))
        return real[0], write
    monkeypatch.setattr(edit, "load_planner", planner_seen)

    def run_steps(image, steps, work_size, find, edit, masks):  # instead of loading and running FLUX.1-Kontext
        gc.collect()
        alive.append(any(r() is not None for r in refs))
        return image, [{"step": 1, "text": steps[0].text, "region": "the background", "area": 0.5, "seconds": 0.0}]
    monkeypatch.setattr(agents, "run_steps", run_steps)
    r = page.submit(None, "chelsea", "blur the background", "base")
    assert r["plan"] == [["blur", "background", "strongly"]] and page.planners == {}
    assert unloads == [1, 1]  # before the planner loaded, and (edit_image) before the agents
    assert alive == [False]


def test_the_page_builds(page):
    """The Gradio page: its components, with the ids the browser test finds them by."""
    demo = app.build(page)
    ids = {c.elem_id for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    assert {"upload", "builtin", "request", "planner-choice", "adapter-folder", "run", "status", "before", "after",
            "raw", "plan", "order", "masks", "downloads"} <= ids


def test_only_the_page_imports_gradio():
    """train.py, edit.py and the rest never pay for Gradio's import."""
    import ast
    from pathlib import Path
    for path in Path(app.__file__).parent.glob("*.py"):
        names = {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.ImportFrom) and n.module}
        assert ("gradio" in names) == (path.name == "app.py"), path.name


def test_startup_checks_are_edit_pys(tmp_path, monkeypatch):
    """A wrong --adapter or a gpu24 page without a GPU stops before anything loads or serves."""
    import torch
    with pytest.raises(SystemExit, match=f"error: {tmp_path} is not an adapter folder"):
        app.main(["--adapter", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="error: the gpu24 preset needs a CUDA GPU"):
        app.main(["--preset", "gpu24"])
