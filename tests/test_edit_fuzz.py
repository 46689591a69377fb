"""Misuses of edit.py, and a few good uses, as one table. For every case: either a non-zero exit with one line
(`error: ...`; argparse's own errors print its usage, then one `edit.py: error: ...` line) and no traceback, or a
valid output; the input's bytes unchanged; and on failure no file written or changed. The planner is a fake that
records whether it was asked for, so each failing case also shows it failed before any model would load. Most
cases run edit.main in this process; a few run `python edit.py` to show that no traceback reaches stderr."""
import argparse
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import edit

FLIP = "<action>flip</action><subject>whole image</subject><goal>horizontal</goal>"


def png(d, name="in.png", size=(48, 32), mode="RGB"):
    """A small picture (left half red, right half blue; 16-bit grey for mode I;16) saved as d/name."""
    im = Image.new("RGB", size, "red")
    im.paste("blue", (size[0] // 2, 0, *size))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L"), np.uint16) * 257)
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(d / name, format="PNG" if name.endswith((".png", ".json", ".PNG")) else None)
    return d / name


def raw(d, name, data):
    (d / name).write_bytes(data)
    return d / name


def bomb(d):
    """A PNG whose header claims 20000 x 20000 pixels: PIL refuses to open it (decompression bomb)."""
    b = bytearray(png(d, "bomb.png", (1, 1)).read_bytes())
    b[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width, height
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    return raw(d, "bomb.png", bytes(b))


def gif(d):
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    frames[0].paste("white", (20, 0, 40, 30))
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return d / "anim.gif"


def adapter(d, weights=b"ok", config=None, preset="cpu"):
    """d/runs/r/adapter with its run's config.json; `weights`: b"ok" for a valid (empty) safetensors file, None for
    none, else these bytes; `config`: the bytes of adapter_config.json (default: a cpu LoRA's)."""
    a = d / "runs" / "r" / "adapter"
    a.mkdir(parents=True)
    if preset:
        (a.parent / "config.json").write_text(json.dumps({"preset": preset}))
    (a / "adapter_config.json").write_bytes(config or json.dumps({"peft_type": "LORA", "base_model_name_or_path":
                                                                  "x/smollm2-135m-instruct"}).encode())
    if weights == b"ok":
        save_file({}, a / "adapter_model.safetensors")
    elif weights is not None:
        (a / "adapter_model.safetensors").write_bytes(weights)
    return a


def linked(d, how):
    src = png(d)
    (os.symlink if how == "symlink" else os.link)(src, d / "out.png")
    return [src, "mirror it", "--out", d / "out.png", "--force"]


def exists(d, name):
    raw(d, name, b"precious")
    return [png(d), "mirror it", "--out", d / "out.png", "--compare"]


JUNK = np.random.default_rng(0).bytes(3000)
# (name, argv given the case's folder, what must happen: a regex of the one-line error, or "ok" with checks)
CASES = [
    ("missing", lambda d: [d / "missing.png", "blur it"], r"image .*missing.png not found"),
    ("folder", lambda d: [(d / "pics.png").mkdir() or d / "pics.png", "blur it"], r"pics.png is a folder, not an"),
    ("empty file", lambda d: [raw(d, "e.png", b""), "blur it"], r"e.png is empty \(0 bytes\)"),
    ("text file", lambda d: [raw(d, "t.png", b"not an image"), "blur it"], r"t.png is not an image PIL can read"),
    ("random bytes", lambda d: [raw(d, "r.jpg", JUNK), "blur it"], r"r.jpg is not an image PIL can read"),
    ("truncated", lambda d: [raw(d, "cut.png", png(d, size=(200, 200)).read_bytes()[:400]), "blur it"],
     r"cut.png: cannot read image \(truncated or corrupt\)"),
    ("device", lambda d: ["/dev/null", "blur it"], r"/dev/null is not a regular file"),
    ("decompression bomb", lambda d: [bomb(d), "blur it"], r"bomb.png is too large to open safely"),
    ("empty instruction", lambda d: [png(d), ""], r"the instruction is empty"),
    ("blank instruction", lambda d: [png(d), " \n\t "], r"the instruction is empty"),
    ("no words", lambda d: [png(d), "!!! ???"], r"has no words"),
    ("long instruction", lambda d: [png(d), "a" * 1001], r"keep it under 1000"),
    ("out .txt", lambda d: [png(d), "blur it", "--out", d / "o.txt"], r"unknown image extension '.txt'"),
    ("out without extension", lambda d: [png(d), "blur it", "--out", d / "o"], r"unknown image extension ''"),
    ("out .psd", lambda d: [png(d), "blur it", "--out", d / "o.psd"], r"PIL reads PSD images but cannot write"),
    ("out .xbm", lambda d: [png(d), "blur it", "--out", d / "o.xbm"], r"cannot save an RGB image as XBM"),
    ("out .h5", lambda d: [png(d), "blur it", "--out", d / "o.h5"], r"cannot save an RGB image as HDF5"),
    ("out is the input", lambda d: [png(d), "blur it", "--out", d / "in.png", "--force"], r"is the input image"),
    ("out is a symlink to the input", lambda d: linked(d, "symlink"), r"out.png \(--out\) is the input image"),
    ("out is a hard link to the input", lambda d: linked(d, "hard link"), r"out.png \(--out\) is the input image"),
    ("compare is the input", lambda d: [png(d, "a_compare.png"), "brighten it", "--out", d / "a.png", "--compare",
                                        "--force"], r"a_compare.png \(the compare picture\) is the input image"),
    ("trace is the input", lambda d: [png(d, "a.json"), "brighten it", "--out", d / "a.png", "--force"],
     r"a.json \(the trace\) is the input image"),
    ("temporary file is the input", lambda d: [png(d, ".a.png.tmp.png"), "brighten it", "--out", d / "a.png"],
     r"\(the temporary file of --out\) is the input image"),
    ("out folder missing", lambda d: [png(d), "blur it", "--out", d / "no" / "o.png"], r"folder .*no does not exist"),
    ("out is a folder", lambda d: [png(d), "blur it", "--out", (d / "o.png").mkdir() or d / "o.png", "--force"],
     r"o.png: it is a folder"),
    ("trace is a folder", lambda d: [png(d), "blur it", "--out", (d / "o.json").mkdir() or d / "o.png", "--force"],
     r"o.json: it is a folder"),
    ("out exists", lambda d: exists(d, "out.png"), r"out.png already exists; pass --force"),
    ("compare exists", lambda d: exists(d, "out_compare.png"), r"out_compare.png already exists; pass --force"),
    ("adapter missing", lambda d: [png(d), "blur it", "--adapter", d / "nowhere"], r"is not an adapter folder"),
    ("adapter weights random", lambda d: [png(d), "blur it", "--adapter", adapter(d, JUNK)],
     r"adapter_model.safetensors is damaged, not a safetensors file \(.*header too large"),
    ("adapter weights empty", lambda d: [png(d), "blur it", "--adapter", adapter(d, b"")],
     r"adapter_model.safetensors is damaged"),
    ("adapter weights missing", lambda d: [png(d), "blur it", "--adapter", adapter(d, None)],
     r"has no adapter_model.safetensors"),
    ("adapter config bytes", lambda d: [png(d), "blur it", "--adapter", adapter(d, config=b"\xff\xfe!", preset=None)],
     r"adapter_config.json is not valid JSON"),
    ("adapter config a list", lambda d: [png(d), "blur it", "--adapter", adapter(d, config=b"[1]", preset=None)],
     r"adapter_config.json holds a JSON list, not an object"),
    ("adapter of another preset", lambda d: [png(d), "blur it", "--adapter", adapter(d, preset="gpu24"),
                                             "--preset", "cpu"], r"was trained for the gpu24 preset"),
    ("no instruction", lambda d: [png(d)], r"the following arguments are required: instruction"),
    ("unknown preset", lambda d: [png(d), "blur it", "--preset", "huge"], r"invalid choice: 'huge'"),
    ("max_new_tokens not a number", lambda d: [png(d), "blur it", "--max_new_tokens", "many"], r"invalid int"),
    ("max_new_tokens 0", lambda d: [png(d), "blur it", "--max_new_tokens=0"], r"must be at least 1, not 0"),
    ("unknown flag", lambda d: [png(d), "blur it", "--colour", "red"], r"unrecognized arguments: --colour red"),
    # good uses: a valid output of the right size
    ("plain", lambda d: [png(d), "mirror it"], "ok"),
    ("animated gif", lambda d: [gif(d), "mirror it", "--compare"], "ok"),
    ("alpha to jpg", lambda d: [png(d, mode="RGBA"), "mirror it", "--out", d / "o.jpg"], "ok"),
    ("alpha to webp", lambda d: [png(d, mode="RGBA"), "mirror it", "--out", d / "o.webp"], "ok"),
    ("16-bit grey to tiff", lambda d: [png(d, mode="I;16"), "mirror it", "--out", d / "o.tiff"], "ok"),
    ("palette to gif", lambda d: [png(d, mode="P"), "mirror it", "--out", d / "o.gif"], "ok"),
    ("one pixel", lambda d: [png(d, size=(1, 1)), "mirror it", "--out", d / "o.bmp"], "ok"),
    ("unicode names", lambda d: [png(d, "my phötö.png"), "  mirror\n it 😀 ", "--out", d / "ünï cødé.PNG"], "ok"),
    ("overwrite with force", lambda d: [png(d), "mirror it", "--out", raw(d, "o.png", b"old"), "--force"], "ok"),
    ("input is a symlink", lambda d: [os.symlink(png(d), d / "ln.png") or d / "ln.png", "mirror it"], "ok"),
]
SUBPROCESS = ["compare is the input", "out .psd", "adapter weights random"]


def snapshot(d):
    """Every file, folder and symlink under d, with its bytes or target: what a failed run must leave alone."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = Path(root) / n
            out[p] = ("link", os.readlink(p)) if p.is_symlink() else ("dir",) if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def case(tmp_path, monkeypatch, request):
    """(argv, want, folder, snapshot before, planner loads) of the named case, in its own folder, with a fake
    planner that records each time it is asked for."""
    name, make, want = next(c for c in CASES if c[0] == request.param)
    loads = []
    monkeypatch.setattr(edit, "load_planner", lambda *a, **k: loads.append(a) or (None, lambda x, d, im: FLIP))
    monkeypatch.chdir(tmp_path)  # no runs/ here: the base planner, unless a case names an adapter
    argv = [str(a) for a in make(tmp_path)]
    return argv, want, tmp_path, snapshot(tmp_path), loads


def outputs(argv):
    """The files a successful run writes (by edit.py's own rule)."""
    given = argparse.Namespace(image=argv[0], out=argv[argv.index("--out") + 1] if "--out" in argv else None,
                               compare="--compare" in argv, force=True)  # force: here only the names matter
    return [Path(p).absolute() for p in edit.output_paths(given) if p]


@pytest.mark.parametrize("case", [c[0] for c in CASES], indirect=True)
def test_case(case, capsys):
    argv, want, d, before, loads = case
    try:
        rec = edit.main(argv + ["--no-describe"])  # no perception: no models at all
    except SystemExit as e:
        err = capsys.readouterr().err
        assert want != "ok", f"a good use failed: {e.code} {err}"
        if e.code == 2:  # argparse: its usage, then one error line
            msg = err.strip().splitlines()[-1]
            assert re.match(r"\S+: error: ", msg), err
        else:
            msg = str(e.code)
            assert msg.startswith("error: ") and "\n" not in msg, msg
        assert "Traceback" not in err
        assert re.search(want, msg), msg
        assert snapshot(d) == before  # nothing written, nothing changed, the input included
        assert loads == []  # failed before the planner would load
        return
    assert want == "ok", f"expected an error matching {want!r}, got a result"
    written = outputs(argv)
    after = snapshot(d)
    assert set(after) - set(before) <= set(written)
    assert all(after[p] == v for p, v in before.items() if p not in written)  # the input included
    img = Image.open(written[0])
    img.load()
    assert [img.width, img.height] == rec["size_out"] == rec["size_in"] and rec["steps"][0]["text"].startswith("flip")
    assert json.loads(written[1].read_text())["output"] == rec["output"]
    if argv[0].endswith(".gif"):
        assert rec["frames_in"] == 3 and "3 frames, only the first is edited" in capsys.readouterr().out


@pytest.mark.parametrize("case", SUBPROCESS, indirect=True)
def test_case_as_a_command(case):
    """The real command line: one line on stderr, exit status 1, no traceback, nothing written."""
    argv, want, d, before, _ = case
    root = Path(edit.__file__).parent
    r = subprocess.run([sys.executable, str(root / "edit.py"), *argv], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert re.search(want, r.stderr)
    assert snapshot(d) == before
