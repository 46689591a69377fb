"""edit.py end to end. The planner is swapped for a fixed answer (its own tests are elsewhere) so that these tests
check what edit.py does with a plan: the agents, the files it writes, and every kind of bad input."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import agents
import edit
import planner
import vlm
from data import builtin_image

PLANS = {"face+bg": "<action>brighten; blur</action><subject>face; background</subject><goal>strongly; strongly</goal>",
         "flip": "<action>flip</action><subject>whole image</subject><goal>horizontal</goal>",
         "crop+gray": "<action>grayscale; crop</action><subject>whole image; whole image</subject><goal>full; 16:9"
                      "</goal>"}


@pytest.fixture
def planner_says(monkeypatch):
    """Make the planner answer `text`, without loading a model; `asked` keeps whether it was to be constrained."""
    asked, loads = [], []

    def say(text):
        def load(preset, adapter, n, model=False, constrain=False, name=None):
            asked.append(constrain)
            loads.append((preset, adapter))
            return None, lambda x, d, image: text
        monkeypatch.setattr(edit, "load_planner", load)
    say.asked, say.loads = asked, loads  # loads: (preset, adapter) of every planner edit.py asked for
    return say


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "astronaut.png"
    builtin_image("astronaut", 512).save(p)
    return p


def run(*argv):
    return edit.main([str(a) for a in argv] + ["--base"])


def test_two_steps_in_order_with_trace_and_compare(planner_says, photo):
    planner_says(PLANS["face+bg"])
    rec = run(photo, "make his face much brighter and blur the background a lot", "--compare")
    out = photo.with_name("astronaut_edited.png")
    trace = json.loads(out.with_suffix(".json").read_text())
    assert trace["plan"]["action"] == ["brighten", "blur"] and trace == json.loads(json.dumps(rec))
    assert trace["constrained"] is True and planner_says.asked == [True]  # the cpu preset's default
    run(photo, "blur the background", "--no-constrain", "--force")
    assert planner_says.asked == [True, False]
    assert json.loads(out.with_suffix(".json").read_text())["constrained"] is False
    assert [s["text"] for s in trace["steps"]] == ["brighten the face: strongly", "blur the background: strongly"]
    assert [s["agent"] for s in trace["steps"]] == ["face", "background"]
    assert all("error" not in s and s["seconds"] > 0 for s in trace["steps"])
    before, after = np.asarray(Image.open(photo), float), np.asarray(Image.open(out).convert("RGB"), float)
    assert after.shape == before.shape and np.abs(after - before).mean() > 1
    pic = Image.open(photo.with_name("astronaut_edited_compare.png"))
    assert pic.width == 2 * 384 + 8 and pic.height > 384
    assert trace["description"] and "person" in trace["description"]


def test_loads_only_the_agents_the_plan_uses(planner_says, photo):
    agents.unload()
    planner_says(PLANS["flip"])
    rec = run(photo, "mirror it", "--no-describe")
    assert rec["agents_loaded"] == ["retouch"] and rec["description"] is None
    out = np.asarray(Image.open(rec["output"]))
    assert np.array_equal(out, np.asarray(Image.open(photo))[:, ::-1])
    agents.unload()
    planner_says("<action>brighten</action><subject>face</subject><goal>slightly</goal>")
    rec = run(photo, "brighten his face a little", "--no-describe", "--force")
    assert sorted(rec["agents_loaded"]) == ["face", "retouch"]  # MediaPipe found the face: no Haar, no others
    assert set(rec["agent_load_seconds"]) == {"face", "retouch"} and rec["steps"][0]["agent"] == "face"


def test_refuses_to_overwrite(planner_says, photo, tmp_path):
    planner_says(PLANS["flip"])
    out = tmp_path / "mine.png"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit, match="already exists; pass --force"):
        run(photo, "mirror it", "--out", out, "--no-describe")
    assert out.read_bytes() == b"precious"
    run(photo, "mirror it", "--out", out, "--no-describe", "--force")
    assert Image.open(out).size == (512, 512)
    before = photo.read_bytes()
    with pytest.raises(SystemExit, match="is the input image"):
        run(photo, "mirror it", "--out", photo, "--force", "--no-describe")
    assert photo.read_bytes() == before
    with pytest.raises(SystemExit, match="unknown image extension '.txt'"):
        run(photo, "mirror it", "--out", tmp_path / "x.txt")


def test_never_writes_over_the_input(planner_says, photo, tmp_path):
    """Not by the compare picture, the trace or a temporary file either, nor through a symlink or a hard link;
    with --force too, and before the planner loads."""
    planner_says(PLANS["flip"])
    d = tmp_path / "x"
    d.mkdir()
    cases = {"a_compare.png": ["--out", d / "a.png", "--compare"],  # the compare picture: x/a_compare.png
             "a.json": ["--out", d / "a.png"],  # the trace: x/a.json (PIL reads a PNG by its bytes, not its name)
             ".a.png.tmp.png": ["--out", d / "a.png"],  # save_atomic's temporary file
             "link.png": ["--out", d / "b.png"]}  # b.png: a symlink, then a hard link to the input
    for name, argv in cases.items():
        src = d / name
        src.write_bytes(photo.read_bytes())
        if name == "link.png":
            (d / "b.png").symlink_to(src)
        for _ in range(2):
            with pytest.raises(SystemExit, match=rf"^error: {d}/{name if name != 'link.png' else 'b.png'} .*is the "
                                                 "input image; edit.py never writes over its input"):
                run(src, "mirror it", *argv, "--force", "--no-describe")
            assert src.read_bytes() == photo.read_bytes(), name
            if name == "link.png" and (d / "b.png").is_symlink():
                (d / "b.png").unlink()
                os.link(src, d / "b.png")
        assert not [p for p in d.iterdir() if p.name not in cases and p.name != "b.png"], name
    assert planner_says.loads == []


def test_damaged_adapter_is_named(planner_says, tmp_path):
    """An adapter_model.safetensors of random bytes, cut short or missing: one line naming the file, before any
    model loads (safetensors' own "header too large" names none)."""
    planner_says(PLANS["flip"])
    img = _save(Image.new("RGB", (32, 24), "red"), tmp_path / "p.png")
    ada = _adapter(tmp_path, "r", "cpu", str(tmp_path / "smollm2-135m-instruct"))
    weights = ada / "adapter_model.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(4, 8)}, weights)
    good = weights.read_bytes()
    for data, why in [(np.random.default_rng(0).bytes(4096), "header too large"),
                      (good[:-8], "file not fully covered"), (b"", "header too small")]:
        weights.write_bytes(data)
        with pytest.raises(SystemExit, match=rf"^error: {weights} is damaged, not a safetensors file \(.*{why}"):
            edit.main([str(img), "mirror it", "--adapter", str(ada)])
    weights.unlink()
    with pytest.raises(SystemExit, match=rf"^error: {ada} has no adapter_model.safetensors"):
        edit.main([str(img), "mirror it", "--adapter", str(ada)])
    (ada.parent / "config.json").unlink()  # so that the preset is read from adapter_config.json, here bytes
    (ada / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SystemExit, match=rf"^error: {ada}/adapter_config.json is not valid JSON"):
        edit.main([str(img), "mirror it", "--adapter", str(ada)])
    assert planner_says.loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "runs"]


def test_output_formats_pil_can_write(planner_says, photo, tmp_path):
    """Every extension PIL knows: edit.py either refuses it before any work, or PIL writes an RGB image (and RGBA
    where edit.py keeps transparency) to it. .psd used to run the whole edit and end in KeyError: 'PSD'."""
    from pathlib import Path as P
    refused = []
    for ext in sorted(Image.registered_extensions()):
        try:
            edit.check_format(P(f"x{ext}"))
        except SystemExit as e:
            assert str(e).startswith(f"error: cannot write x{ext}: ") and "\n" not in str(e), ext
            refused.append(ext)
            continue
        for mode in ("RGB", "RGBA") if ext in edit.KEEPS_ALPHA else ("RGB",):
            Image.new(mode, (40, 30), "red").save(tmp_path / f"x{ext}")  # raises if the check let a bad one by
    assert {".psd", ".xbm", ".palm", ".msp", ".blp", ".h5", ".grib", ".xpm", ".fits"} <= set(refused)
    assert not {".png", ".jpg", ".webp", ".tif", ".gif", ".bmp"} & set(refused)
    planner_says(PLANS["flip"])
    for ext, why in [(".psd", "PIL reads PSD images but cannot write them"),
                     (".xbm", "PIL cannot save an RGB image as XBM")]:
        with pytest.raises(SystemExit, match=rf"^error: cannot write .*out{ext}: {why}"):
            run(photo, "mirror it", "--out", tmp_path / f"out{ext}", "--no-describe")
    assert planner_says.loads == [] and not list(tmp_path.glob("out*"))


def test_animated_image_first_frame(planner_says, tmp_path, capsys):
    """A 3-frame GIF: its first frame is edited and written, and the screen and the trace say so."""
    planner_says(PLANS["flip"])
    frames = []
    for left, right in [("red", "blue"), ("green", "white"), ("black", "yellow")]:
        im = Image.new("RGB", (40, 30), left)
        im.paste(right, (20, 0, 40, 30))
        frames.append(im)
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    rec = run(gif, "mirror it", "--no-describe")
    assert rec["frames_in"] == 3 and "(40x30, mode P; 3 frames, only the first is edited)" in capsys.readouterr().out
    out = np.asarray(Image.open(rec["output"]).convert("RGB"))
    assert np.array_equal(out, np.asarray(frames[0])[:, ::-1])
    assert json.loads(Path(rec["output"]).with_suffix(".json").read_text())["frames_in"] == 3
    assert run(tmp_path / "anim_edited.png", "mirror it", "--no-describe")["frames_in"] == 1


def test_no_log_noise_on_stderr(tmp_path):
    """A real run with perception (MediaPipe's face and selfie models, RapidOCR) and the face agent, in a fresh
    process, writes nothing to stderr: MediaPipe's C++ used to write four lines of TFLite and absl log there."""
    import subprocess
    import sys
    img = _save(builtin_image("astronaut", 256), tmp_path / "a.png")
    plan = "<action>brighten</action><subject>face</subject><goal>slightly</goal>"
    code = ("import sys, edit; plan = sys.argv.pop(); edit.load_planner = lambda *a, **k: (None, lambda x, d, im: "
            "plan); edit.main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, str(img), "brighten his face", "--base", plan],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(Path(edit.__file__).parent)})
    assert r.returncode == 0 and "wrote" in r.stdout and "face" in r.stdout, r.stdout + r.stderr
    assert r.stderr == ""


def test_bad_inputs(planner_says, photo, tmp_path):
    planner_says(PLANS["flip"])
    with pytest.raises(SystemExit, match="not found"):
        run(tmp_path / "missing.png", "blur it")
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    with pytest.raises(SystemExit, match="not an image PIL can read"):
        run(junk, "blur it")
    cut = tmp_path / "cut.png"
    cut.write_bytes(photo.read_bytes()[:5000])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        run(cut, "blur it")
    (tmp_path / "shots.png").mkdir()  # a folder and an empty file: said as such, not "not found", "not an image"
    with pytest.raises(SystemExit, match=r"shots.png is a folder, not an image file$"):
        run(tmp_path / "shots.png", "blur it")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"empty.png is empty \(0 bytes\), not an image$"):
        run(tmp_path / "empty.png", "blur it")
    for p in ("shots.png", "empty.png"):
        (tmp_path / p).unlink() if p == "empty.png" else (tmp_path / p).rmdir()
    for words, why in [("   ", "instruction is empty"), ("!!! ???", "has no words"), ("a" * 1001, "under 1000")]:
        with pytest.raises(SystemExit, match=why):
            run(photo, words)
    planner_says("sure! here is the edited image")  # malformed planner output
    with pytest.raises(SystemExit, match="does not follow the <action><subject><goal> format"):
        run(photo, "make it nice", "--no-describe")
    planner_says("<action>teleport</action><subject>cat</subject><goal>mars</goal>")  # an action no editor has
    with pytest.raises(SystemExit, match="no step could be applied"):
        run(photo, "send the cat to mars", "--no-describe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astronaut.png", "cut.png", "notes.png"]


def test_adapter_choice(tmp_path, monkeypatch):
    assert planner.newest_adapter(tmp_path) is None
    for name in ("old", "new"):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "adapter_config.json").write_text("{}")
    assert planner.newest_adapter(tmp_path) == tmp_path / "new" / "adapter"
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    with pytest.raises(SystemExit, match="is not an adapter folder"):
        edit.main([str(img), "blur it", "--adapter", str(tmp_path / "nowhere")])


def _adapter(root, name, preset=None, base="", age=0):
    """runs/<name>/adapter as train.py leaves it: config.json with the preset (if given) beside the adapter,
    adapter_config.json with peft's base_model_name_or_path, a (here empty) adapter_model.safetensors; saved `age`
    hours ago."""
    folder = root / "runs" / name / "adapter"
    folder.mkdir(parents=True)
    if preset:
        (folder.parent / "config.json").write_text(json.dumps({"preset": preset, "seed": 0}))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    save_file({}, folder / "adapter_model.safetensors")
    t = 1_700_000_000 - 3600 * age
    os.utime(folder, (t, t))
    return folder


def test_adapter_preset(tmp_path):
    cache = tmp_path / ".cache" / "imageedit-r1"
    cases = {"a": (None, vlm.MODELS["7b"], "gpu24"), "b": (None, vlm.MODELS["3b"], "gpu24"),
             "c": (None, str(cache / "tiny-qwen2.5-vl"), "tiny_vl"),
             "d": (None, str(cache / "smollm2-135m-instruct"), "cpu"),
             "e": (None, str(cache / "smollm2-135m-instruct-nf4-dequantized"), "cpu"),
             "f": (None, str(cache / "tiny-llama"), "tiny"),
             "g": ("gpu24", "/models/my-own-qwen", "gpu24"),  # the run's config.json wins over the base
             "h": (None, "gpt2", None)}
    for name, (preset, base, want) in cases.items():
        got, how = planner.adapter_preset(_adapter(tmp_path, name, preset, base))
        assert got == want, (name, how)
    assert "config.json" in planner.adapter_preset(tmp_path / "runs" / "g" / "adapter")[1]
    assert "'gpt2' is not a preset's planner" in planner.adapter_preset(tmp_path / "runs" / "h" / "adapter")[1]


def test_newest_adapter_of_the_asked_preset(planner_says, tmp_path, monkeypatch, capsys):
    """A gpu24 run newer than the cpu one: edit.py's default cpu preset takes the cpu adapter, and says what it
    skipped. An adapter whose preset cannot be told is skipped too: only an adapter named by hand gets a guess."""
    monkeypatch.chdir(tmp_path)
    planner_says(PLANS["flip"])
    cpu = _adapter(tmp_path, "cpu_run", "cpu", str(tmp_path / "smollm2-135m-instruct"), age=3)
    gpu = _adapter(tmp_path, "gpu_run", "gpu24", vlm.MODELS["7b"], age=1)
    _adapter(tmp_path, "odd", None, "gpt2", age=0)
    _adapter(tmp_path, "tiny_run", None, str(tmp_path / "tiny-qwen2.5-vl"), age=2)
    assert planner.newest_adapter("runs", "gpu24").resolve() == gpu
    assert planner.newest_adapter("runs").name == "adapter" and planner.newest_adapter("runs").parent.name == "odd"
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    rec = edit.main([str(img), "mirror it", "--no-describe"])
    assert planner_says.loads == [("cpu", Path("runs/cpu_run/adapter"))] and rec["preset"] == "cpu"
    assert rec["adapter"] == str(Path("runs/cpu_run/adapter")) and cpu.exists()
    out = capsys.readouterr().out
    assert "skipped 3 adapter(s) under runs/ that are not for the cpu preset: 1 gpu24, 1 of unknown preset, " \
           "1 tiny_vl" in out
    assert "adapter runs/cpu_run/adapter (newest cpu adapter under runs/)" in out
    edit.main([str(img), "mirror it", "--no-describe", "--preset=tiny", "--force"])  # no tiny adapter: the base
    assert planner_says.loads[-1] == ("tiny", None) and "base model, no adapter" in capsys.readouterr().out


def test_explicit_adapter_sets_the_preset(planner_says, tmp_path, monkeypatch, capsys):
    planner_says(PLANS["flip"])
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    tiny_vl = _adapter(tmp_path, "tv", "tiny_vl", str(tmp_path / "tiny-qwen2.5-vl"))
    rec = edit.main([str(img), "mirror it", "--adapter", str(tiny_vl)])
    assert planner_says.loads == [("tiny_vl", tiny_vl)] and rec["preset"] == "tiny_vl"
    assert f"preset: tiny_vl (from the adapter's run, {tiny_vl.parent / 'config.json'})" in capsys.readouterr().out
    # gpu24 taken from the adapter still needs CUDA: refused on a machine without it, before any model loads
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = _adapter(tmp_path, "g", None, vlm.MODELS["7b"])  # no config.json: the base model tells
    with pytest.raises(SystemExit, match=f"gpu24 preset needs a CUDA GPU.*{gpu} is a gpu24 adapter"):
        edit.main([str(img), "mirror it", "--adapter", str(gpu), "--force"])
    assert f"preset: gpu24 (from the adapter's base model {vlm.MODELS['7b']})" in capsys.readouterr().out
    assert len(planner_says.loads) == 1


def test_explicit_adapter_of_another_preset_is_an_error(planner_says, tmp_path):
    planner_says(PLANS["flip"])
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    gpu = _adapter(tmp_path, "g", "gpu24", vlm.MODELS["7b"])
    for preset in ("cpu", "tiny_vl"):
        with pytest.raises(SystemExit, match=f"{gpu} was trained for the gpu24 preset .*not for --preset {preset}"):
            edit.main([str(img), "mirror it", "--adapter", str(gpu), "--preset", preset])
    assert planner_says.loads == [] and not (tmp_path / "p_edited.png").exists()  # nothing loaded, nothing written


def test_explicit_adapter_of_unknown_preset(planner_says, tmp_path, capsys):
    """Named by hand, an adapter whose preset cannot be told is used with the preset asked for (default cpu), with
    a warning: the user chose it, and a wrong one fails loudly when merged (planner.merge_lora checks every layer)."""
    planner_says(PLANS["flip"])
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    odd = _adapter(tmp_path, "odd", None, "gpt2")
    rec = edit.main([str(img), "mirror it", "--adapter", str(odd), "--no-describe"])
    assert planner_says.loads == [("cpu", odd)] and rec["preset"] == "cpu"
    out = capsys.readouterr().out
    assert f"warning: cannot tell which preset {odd} was trained for (no {odd.parent / 'config.json'} and its " \
           "base model 'gpt2' is not a preset's planner); using it with the cpu planner" in out
    edit.main([str(img), "mirror it", "--adapter", str(odd), "--preset=tiny", "--no-describe", "--force"])
    assert planner_says.loads[-1] == ("tiny", odd) and "with the tiny planner" in capsys.readouterr().out


def test_tiny_planner_end_to_end(tmp_path, monkeypatch, capsys):
    """The real (random) tiny planner: its output is not a plan, which edit.py says, writing nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the tiny preset builds its model in the cache
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    with pytest.raises(SystemExit, match="does not follow"):
        edit.main([str(img), "blur the background", "--preset=tiny", "--max_new_tokens=8", "--base",
                   "--no-describe"])
    out = capsys.readouterr().out
    assert "(32x24, mode RGB)" in out and "base model, no adapter" in out and "planner output:" in out
    assert not (tmp_path / "p_edited.png").exists()


def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def test_image_modes(planner_says, tmp_path):
    """Palette, grey, alpha, 16-bit, CMYK and EXIF-rotated inputs: read right, edited, written right."""
    planner_says(PLANS["crop+gray"])
    rgb = builtin_image("chelsea", 128)
    a = np.asarray(rgb.convert("L"), np.uint16) * 257
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize((128, 128)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels are turned; upright is 90 degrees clockwise
    cases = {"palette.png": rgb.convert("P"), "grey.png": rgb.convert("L"), "alpha.png": rgba,
             "grey16.png": Image.fromarray(a), "cmyk.jpg": rgb.convert("CMYK"),
             "exif.jpg": rgb.crop((0, 0, 128, 64))}
    for name, im in cases.items():
        p = _save(im, tmp_path / name, **({"exif": exif} if name == "exif.jpg" else {}))
        rec = run(p, "make it black and white and 16:9", "--no-describe")
        out = Image.open(rec["output"])
        w, h = (64, 128) if name == "exif.jpg" else (128, 128)  # upright first, then the 16:9 crop
        assert rec["size_in"] == [w, h] and out.size == (w, round(w * 9 / 16)), name
        px = np.asarray(out.convert("RGB"), float)
        assert np.abs(px[..., 0] - px[..., 2]).max() <= 1, name  # grey
        assert 60 < px.mean() < 200, name  # not clipped to white (16-bit) nor black
        assert (out.mode == "RGBA") == (name == "alpha.png"), name
    alpha = np.asarray(Image.open(tmp_path / "alpha_edited.png").getchannel("A"))
    rows = np.asarray(Image.linear_gradient("L").resize((128, 128)))[28:100].mean(1)  # the 16:9 band of rows
    assert alpha.shape == (72, 128) and np.abs(alpha.mean(1) - rows).max() <= 1  # cropped like the picture


def test_large_image_regions_small_edits_full(planner_says, tmp_path):
    planner_says(PLANS["face+bg"])
    big = _save(builtin_image("astronaut", 512).resize((3000, 3000)), tmp_path / "big.png")
    rec = run(big, "brighten his face and blur the background", "--no-describe")
    out = np.asarray(Image.open(rec["output"]), float)
    src = np.asarray(Image.open(big), float)
    assert out.shape == (3000, 3000, 3) and [s["agent"] for s in rec["steps"]] == ["face", "background"]
    face = rec["steps"][0]["area"]
    assert 0.01 < face < 0.15
    y0, x0 = 500, 1100  # inside the astronaut's face at this scale: brighter
    assert out[y0:y0 + 200, x0:x0 + 200].mean() > src[y0:y0 + 200, x0:x0 + 200].mean() + 5
