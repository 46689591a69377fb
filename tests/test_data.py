"""Tests for data.py and phrasings.py: built-in images, the synthetic splits and their hold-out, dataset folders,
image loading."""
import json
import random
import string
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import phrasings  # noqa: E402
from data import DataError  # noqa: E402

TRAIN, TEST = phrasings.make_split("train"), phrasings.make_split("test")


def template_ids(samples):
    return {t for s in samples for t in s["template"].split("+")}


def combos(samples):
    return {tuple(sorted(s["action"])) for s in samples if len(s["action"]) > 1}


def check_sample(s, split):
    assert set(s) == {"image", "instruction", "action", "subject", "goal", "template"}
    assert isinstance(s["instruction"], str) and s["instruction"].strip()
    k = len(s["action"])
    assert 1 <= k <= 3 and len(s["subject"]) == k and len(s["goal"]) == k
    for a, subj, g in zip(s["action"], s["subject"], s["goal"]):
        for item in (a, subj, g):
            assert item and item == item.lower().strip() and ";" not in item
        assert a in data.ACTIONS
        assert subj in phrasings.subjects_for(a, s["image"]), (a, subj, s["image"])
        assert g in phrasings.GOALS[a]
    if k > 1:
        assert len(set(s["action"])) == k and phrasings.combo_split(s["action"]) == split
        gone = {subj for a, subj in zip(s["action"], s["subject"]) if a in ("remove", "replace background")}
        assert not any(subj in gone for a, subj in zip(s["action"], s["subject"])
                       if a not in ("remove", "replace background")), s
    assert all(phrasings.TEMPLATE_SPLIT[t] == split for t in s["template"].split("+"))


# ---------------------------------------------------------------------------------------------------------------
# Images

def test_actions_are_the_22_canonical_ones():
    assert len(data.ACTIONS) == len(set(data.ACTIONS)) == 22
    assert {"brighten", "recolor", "replace background", "add grain", "pixelate"} <= set(data.ACTIONS)
    assert list(phrasings.TEMPLATES) == data.ACTIONS and set(phrasings.GOALS) == set(data.ACTIONS)


def test_builtin_images_are_rgb_256_and_deterministic():
    names = data.image_names()
    assert len(names) == len(set(names)) == 17
    for name in names:
        img = data.builtin_image(name)
        assert img.mode == "RGB" and img.size == (256, 256), name
        assert img.tobytes() == data.builtin_image(name).tobytes(), name
    a = data.builtin_image("astronaut")
    a.paste((0, 0, 0), (0, 0, 256, 256))  # a caller drawing on its copy must not change the next caller's image
    assert data.builtin_image("astronaut").getpixel((128, 128)) != (0, 0, 0)
    assert data.builtin_image("chelsea", size=64).size == (64, 64)


def test_builtin_image_bad_input():
    with pytest.raises(DataError, match=r"unknown built-in image 'lena'.*astronaut.*scene7"):
        data.builtin_image("lena")
    with pytest.raises(DataError, match="positive int"):
        data.builtin_image("coffee", size=0)


def test_image_subjects():
    for name in data.image_names():
        assert set(data.REGIONS) <= set(data.image_subjects(name))
    assert {"person", "face", "background"} <= set(data.image_subjects("astronaut"))
    assert "text" in data.image_subjects("page") and "cat" in data.image_subjects("chelsea")
    with pytest.raises(DataError, match="nope"):
        data.image_subjects("nope")


def test_drawn_scenes_show_their_objects():
    """The metadata of a scene must match what is drawn: each named object's colour covers a good patch."""
    for i in range(data.N_SCENES):
        arr = np.asarray(data.builtin_image(f"scene{i}")).astype(int)
        objects = [s for s in data.image_subjects(f"scene{i}") if phrasings._color_of(s)]
        assert 1 <= len(objects) <= 3
        for obj in objects:
            rgb = data.COLORS[obj.split()[0]]
            assert (np.abs(arr - rgb).sum(-1) < 30).sum() > 300, (i, obj)
    assert len({data.builtin_image(f"scene{i}").tobytes() for i in range(data.N_SCENES)}) == data.N_SCENES


# ---------------------------------------------------------------------------------------------------------------
# Requests and splits

def test_default_sizes_and_determinism():
    assert len(TRAIN) == 2000 and len(TEST) == 200
    assert phrasings.make_split("test") == TEST
    assert phrasings.make_split("test", 50, seed=1) == phrasings.make_split("test", 50, seed=1)
    assert phrasings.make_split("test", 50, seed=1) != phrasings.make_split("test", 50, seed=2)
    assert phrasings.make_split("test", 20) == TEST[:20]  # a smaller n is a prefix
    assert phrasings.make_split("train", 0) == []


def test_bad_split_arguments():
    with pytest.raises(DataError, match="'val'"):
        phrasings.make_split("val")
    with pytest.raises(DataError, match="non-negative"):
        phrasings.make_split("train", -1)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_sample_is_valid(split):
    for s in TRAIN if split == "train" else TEST:
        check_sample(s, split)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32), split=st.sampled_from(["train", "test"]))
def test_any_seed_gives_valid_samples(seed, split):
    for s in phrasings.make_split(split, 40, seed=seed):
        check_sample(s, split)


def test_every_template_renders_every_goal():
    rng = random.Random(0)
    for a in phrasings.TEMPLATES:
        for t in [t for split in ("train", "test") for _, t in phrasings.templates(a, split)]:
            slots = {f for _, f, _, _ in string.Formatter().parse(t) if f}
            # exactly one way to carry the goal, so every label can be read off the text
            expect = {"s"} if phrasings.GOALS[a] == ["full"] else None
            if expect:
                assert slots <= expect, (a, t)
            else:
                assert len(slots - {"s"}) == 1, (a, t)
            for g in phrasings.GOALS[a]:
                text = phrasings.render(rng, t, a, "whole image", g)
                assert "{" not in text and "}" not in text


def test_templates_and_combinations_are_held_out():
    for a in data.ACTIONS:
        splits = [phrasings.TEMPLATE_SPLIT[f"{a}/{i}"] for i in range(len(phrasings.TEMPLATES[a]))]
        assert splits.count("test") >= 1 and splits.count("train") >= 2, a
    assert template_ids(TRAIN).isdisjoint(template_ids(TEST))
    assert combos(TRAIN).isdisjoint(combos(TEST))
    assert {s["instruction"] for s in TRAIN}.isdisjoint({s["instruction"] for s in TEST})
    assert combos(TRAIN) and combos(TEST)
    composite = {split: {t.split("/")[0] for t in template_ids(samples)} & set(phrasings.COMPOSITES)
                 for split, samples in (("train", TRAIN), ("test", TEST))}
    assert composite["train"] and composite["test"] and composite["train"].isdisjoint(composite["test"])
    assert len(phrasings.COMPOSITES) >= 4 and all(2 <= len(e) <= 3 for _, e in phrasings.COMPOSITES.values())


def test_no_train_request_is_worded_like_a_test_template():
    """The train-only phrasings are written apart from the test templates: no train request holds a test template's
    fixed words around any slot fillers (the regular expression of the template, slots as wildcards)."""
    import re
    tests = [t for a in phrasings.TEMPLATES for _, t in phrasings.templates(a, "test")]
    patterns = [re.compile(".+?".join(re.escape(w.strip()) for w in re.split(r"\{\w+\}", t) if w.strip()),
                           re.IGNORECASE) for t in tests]
    assert len(patterns) == 2 * len(data.ACTIONS)
    hits = [(s["instruction"], p.pattern) for s in TRAIN for p in patterns
            if p.search(s["instruction"]) and len(p.pattern) > 12]  # "saturate {s}", "{s} is {too} sharp": too short
    assert not hits, hits[:5]
    more = {t.split("/")[1][0] for s in TRAIN for t in s["template"].split("+")}
    assert {"d", "s"} <= more  # the train-only phrasings are used


def test_combo_split_is_stable_and_order_free():
    assert phrasings.combo_split(["blur", "warm"]) == phrasings.combo_split(["warm", "blur"])
    # zlib.crc32 of "blur+brighten+warm" is fixed forever, unlike Python's salted hash()
    assert phrasings.combo_split(["warm", "blur", "brighten"]) == "test"


def test_every_action_appears_in_both_splits():
    for samples in (TRAIN, TEST):
        assert {s["action"][0] for s in samples if len(s["action"]) == 1} == set(data.ACTIONS)
    counts = {k: sum(len(s["action"]) == k for s in TRAIN) for k in (1, 2, 3)}
    assert all(c > 200 for c in counts.values()), counts


# ---------------------------------------------------------------------------------------------------------------
# Folders

def test_round_trip(tmp_path):
    samples = phrasings.make_split("test", 20)
    out = data.write_folder(samples, tmp_path / "ds")
    back = data.read_folder(out)
    assert [b["instruction"] for b in back] == [s["instruction"] for s in samples]
    for b, s in zip(back, samples):
        assert (b["action"], b["subject"], b["goal"]) == (s["action"], s["subject"], s["goal"])
        assert Path(b["image_path"]).is_absolute()
        assert data.load_image(b["image_path"]).tobytes() == data.builtin_image(s["image"]).tobytes()
    assert back[3]["file_name"] == "img/0003.png"
    assert not (out / "metadata.jsonl.tmp").exists()


def test_write_refuses_to_overwrite_and_copies_image_paths(tmp_path):
    first = data.write_folder(phrasings.make_split("train", 3), tmp_path / "a")
    with pytest.raises(DataError, match="already exists"):
        data.write_folder(phrasings.make_split("train", 3), first)
    samples = data.read_folder(first)
    samples[0]["target_path"] = samples[1]["image_path"]
    copy = data.read_folder(data.write_folder(samples, tmp_path / "b"))
    assert [c["instruction"] for c in copy] == [s["instruction"] for s in samples]
    assert data.load_image(copy[0]["target_path"]).tobytes() == data.load_image(samples[1]["image_path"]).tobytes()
    with pytest.raises(DataError, match="no samples"):
        data.write_folder([], tmp_path / "c")
    with pytest.raises(DataError, match="sample 0: labels of unequal length"):
        data.write_folder([{"image": "coffee", "instruction": "x", "action": ["blur"], "subject": ["a", "b"],
                           "goal": ["slightly"]}], tmp_path / "d")
    assert not (tmp_path / "d").exists()  # checked before anything was written
    with pytest.raises(DataError, match="sample 0: has neither"):
        data.write_folder([{"instruction": "blur it"}], tmp_path / "e")


def make_folder(root, lines):
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "img" / "a.png")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


GOOD = json.dumps({"file_name": "img/a.png", "instruction": "blur it", "action": ["blur"],
                   "subject": ["whole image"], "goal": ["slightly"]})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"file_name": "img/a.png", "instruction": '], r"metadata.jsonl:2: invalid JSON"),
    ([GOOD, "", '{"instruction": "x"}'], r"metadata.jsonl:3: missing file_name"),  # blank lines still count
    (['{"file_name": "img/a.png"}'], r"metadata.jsonl:1: missing instruction"),
    ([GOOD, '{"file_name": "img/x.png", "instruction": "x"}'], r"metadata.jsonl:2: image img/x.png not found"),
    (['{"file_name": "img/a.png", "instruction": "x", "action": ["blur", "crop"], "subject": ["face"], '
      '"goal": ["slightly"]}'], r"metadata.jsonl:1: labels of unequal length: action 2, subject 1, goal 1"),
    (['{"file_name": "img/a.png", "instruction": "x", "action": ["blur"]}'], r":1: labels come together"),
    (['{"file_name": "img/a.png", "instruction": "x", "action": "blur", "subject": ["a"], "goal": ["b"]}'],
     r":1: action must be a non-empty list"),
    (['{"file_name": "img/a.png", "instruction": "x", "action": ["a;b"], "subject": ["a"], "goal": ["b"]}'],
     r":1: an item of action contains ';'"),
    (['{"file_name": "img/a.png", "instruction": "x", "target_file_name": "tgt/a.png"}'],
     r":1: target tgt/a.png not found"),
    (["[1, 2]"], r"metadata.jsonl:1: expected a JSON object"),
    (["", "   "], r"metadata.jsonl has no samples"),
])
def test_read_folder_errors(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        data.read_folder(make_folder(tmp_path / "ds", lines))


def test_read_folder_refuses_unknown_actions_and_names_synonyms_canonically(tmp_path):
    def line(actions):
        return json.dumps({"file_name": "img/a.png", "instruction": "x", "action": actions,
                           "subject": ["whole image"] * len(actions), "goal": ["slightly"] * len(actions)})
    root = make_folder(tmp_path / "synonyms", [line(["Lighten"]), line(["black and white", "blur"])])
    assert [s["action"] for s in data.read_folder(root)] == [["brighten"], ["grayscale", "blur"]]
    with pytest.raises(DataError, match=r"metadata.jsonl:2: unknown action 'teleport'; the actions are brighten, "
                                        r"darken, .*, replace background \(or a synonym"):
        data.read_folder(make_folder(tmp_path / "bad", [line(["blur"]), line(["blur", "teleport"])]))


def test_read_folder_refuses_a_metadata_file_that_is_not_text(tmp_path):
    root = make_folder(tmp_path / "binary", [GOOD])
    (root / "metadata.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match="metadata.jsonl is not UTF-8 text"):
        data.read_folder(root)


def test_read_folder_missing_parts_and_blank_lines(tmp_path):
    with pytest.raises(DataError, match="dataset folder .*nowhere does not exist"):
        data.read_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no metadata.jsonl"):
        data.read_folder(tmp_path / "empty")
    root = make_folder(tmp_path / "ok", ["", GOOD, "  ", '{"file_name": "img/a.png", "instruction": "no labels"}'])
    samples = data.read_folder(root)
    assert [s["instruction"] for s in samples] == ["blur it", "no labels"]
    assert samples[0]["action"] == ["blur"] and "action" not in samples[1]


# ---------------------------------------------------------------------------------------------------------------
# Loading images

def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(DataError, match="notes.png is not an image"):
        data.load_image(tmp_path / "notes.png")
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.png: cannot read image \\(truncated"):
        data.load_image(tmp_path / "cut.png")


def test_load_image_is_rgb_and_upright(tmp_path):
    Image.new("L", (40, 20), 128).save(tmp_path / "grey.png")
    assert data.load_image(tmp_path / "grey.png").mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show it rotated by 90 degrees
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "turned.jpg", exif=exif)
    img = data.load_image(tmp_path / "turned.jpg")
    assert img.size == (20, 40) and img.mode == "RGB"
