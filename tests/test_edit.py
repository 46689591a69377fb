import pytest
from PIL import Image

import edit


def test_bad_inputs(tmp_path):
    with pytest.raises(SystemExit, match="does not exist|not found"):
        edit.main([str(tmp_path / "missing.png"), "blur it"])
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    with pytest.raises(SystemExit, match="not an image|cannot identify|not a readable image"):
        edit.main([str(junk), "blur it"])
    ok = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(ok)
    with pytest.raises(SystemExit, match="instruction is empty"):
        edit.main([str(ok), "   "])


def test_plans_with_tiny_planner(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the tiny preset builds its model in the cache
    img = tmp_path / "p.png"
    Image.new("RGB", (32, 24), "red").save(img)
    plan = edit.main([str(img), "blur the background", "--preset=tiny", "--max_new_tokens=8"])
    out = capsys.readouterr().out
    assert "image: " in out and "(32x24)" in out and "base model, no adapter" in out
    assert set(plan) == {"ok", "action", "subject", "goal"}
