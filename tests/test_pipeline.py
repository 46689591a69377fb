"""Single-step requests on the bundled photos, through the real region agents and the CPU editor
(`agents.run_steps`), each checked by a number a person would agree with. Local edits must also leave every pixel
farther than the editor's feather margin from the mask byte-identical."""
import cv2
import numpy as np
import pytest

import agents
import editor
import regions
from plan import Step
from data import builtin_image
from agents import run_steps


def luma(a):
    return a.astype(float) @ [0.299, 0.587, 0.114]


def sat(a):
    return cv2.cvtColor(a, cv2.COLOR_RGB2HSV)[..., 1].astype(float)


def hf(a):  # high-frequency energy per pixel: squared Laplacian of the luminance
    return cv2.Laplacian(luma(a), cv2.CV_64F) ** 2


def mean_in(x, m):
    return float(x[m].mean())


# (image, action, subject, goal, check(before, after, inside, core) -> bool). `inside`: mask > 0.5; `core`: where
# the mask is 1, eroded by the feather margin (the fully edited pixels).
CASES = [
    ("astronaut", "brighten", "face", "strongly", lambda b, a, i, c: mean_in(luma(a), c) > mean_in(luma(b), c) + 15),
    ("chelsea", "brighten", "cat", "moderately", lambda b, a, i, c: mean_in(luma(a), c) > mean_in(luma(b), c) + 8),
    ("rocket", "brighten", "left", "slightly", lambda b, a, i, c: mean_in(luma(a), c) > mean_in(luma(b), c) + 3),
    ("camera", "brighten", "top", "strongly", lambda b, a, i, c: mean_in(luma(a), c) > mean_in(luma(b), c) + 15),
    ("chelsea", "darken", "background", "strongly", lambda b, a, i, c: mean_in(luma(a), c) < mean_in(luma(b), c) - 15),
    ("coffee", "darken", "right", "moderately", lambda b, a, i, c: mean_in(luma(a), c) < mean_in(luma(b), c) - 8),
    ("astronaut", "darken", "person", "slightly", lambda b, a, i, c: mean_in(luma(a), c) < mean_in(luma(b), c) - 3),
    ("camera", "increase contrast", "whole image", "strongly", lambda b, a, i, c: luma(a).std() > 1.3 * luma(b).std()),
    ("rocket", "decrease contrast", "bottom", "strongly",
     lambda b, a, i, c: luma(a)[c].std() < 0.7 * luma(b)[c].std()),
    ("astronaut", "saturate", "person", "strongly", lambda b, a, i, c: mean_in(sat(a), c) > mean_in(sat(b), c) + 10),
    ("coffee", "desaturate", "background", "strongly",
     lambda b, a, i, c: mean_in(sat(a), c) < 0.5 * mean_in(sat(b), c)),
    ("coffee", "grayscale", "cup", "full", lambda b, a, i, c: np.ptp(a[c].astype(int), axis=-1).max() <= 1),
    ("chelsea", "sepia", "whole image", "full",
     lambda b, a, i, c: (a[..., 0] >= a[..., 1]).mean() > 0.99 and (a[..., 1] >= a[..., 2]).mean() > 0.99),
    ("astronaut", "warm", "whole image", "strongly", lambda b, a, i, c: (a[..., 0].astype(float) - a[..., 2]).mean()
     > (b[..., 0].astype(float) - b[..., 2]).mean() + 15),
    ("scene0", "cool", "top", "moderately", lambda b, a, i, c: mean_in(a[..., 2].astype(float) - a[..., 0], c)
     > mean_in(b[..., 2].astype(float) - b[..., 0], c) + 10),
    ("astronaut", "blur", "background", "strongly", lambda b, a, i, c: mean_in(hf(a), c) < 0.3 * mean_in(hf(b), c)),
    ("astronaut", "blur", "face", "moderately", lambda b, a, i, c: mean_in(hf(a), c) < 0.5 * mean_in(hf(b), c)),
    ("camera", "sharpen", "person", "strongly", lambda b, a, i, c: mean_in(hf(a), c) > 2 * mean_in(hf(b), c)),
    ("chelsea", "denoise", "whole image", "strongly", lambda b, a, i, c: hf(a).mean() < 0.8 * hf(b).mean()),
    ("scene1", "vignette", "whole image", "strongly", lambda b, a, i, c: luma(a)[:16, :16].mean()
     < luma(b)[:16, :16].mean() - 30 and abs(luma(a)[120:136, 120:136].mean() - luma(b)[120:136, 120:136].mean()) < 3),
    ("coffee", "add grain", "whole image", "moderately", lambda b, a, i, c: hf(a).mean() > 2 * hf(b).mean()
     and abs(luma(a).mean() - luma(b).mean()) < 2),
    ("astronaut", "pixelate", "face", "strongly", lambda b, a, i, c: mean_in(hf(a), c) < 0.5 * mean_in(hf(b), c)),
    ("astronaut", "replace background", "background", "red",
     lambda b, a, i, c: np.abs(a[c].astype(float) - [215, 40, 40]).mean() < 25),
    ("chelsea", "replace background", "background", "blurred",
     lambda b, a, i, c: mean_in(hf(a), c) < 0.3 * mean_in(hf(b), c)),
]
for scene, obj, to, hue in [("scene2", "red circle", "blue", 110), ("scene5", "blue circle", "yellow", 30),
                            ("scene4", "green circle", "purple", 140), ("scene3", "orange car", "green", 60)]:
    CASES.append((scene, "recolor", obj, to, lambda b, a, i, c, hue=hue: abs(np.median(
        cv2.cvtColor(a, cv2.COLOR_RGB2HSV)[..., 0][c].astype(float)) - hue) < 15))
for scene, obj, color in [("scene2", "red circle", (215, 40, 40)), ("scene1", "purple car", (130, 50, 170))]:
    CASES.append((scene, "remove", obj, "full", lambda b, a, i, c, color=color: (np.abs(a[i].astype(int) - color)
                                                                               .sum(-1) < 60).mean() < 0.02))


@pytest.mark.parametrize("name,action,subject,goal,check", CASES,
                         ids=[f"{c[1]}-{c[2]}-{c[0]}" for c in CASES])
def test_single_step(name, action, subject, goal, check):
    before = np.asarray(builtin_image(name, 256))
    region = regions.find(before, subject)
    assert region.agent != "whole" or subject == "whole image", region.note  # the agent found the subject
    after, trace = run_steps(before, [Step(action, subject, goal)])
    assert "error" not in trace[0], trace[0]
    assert trace[0]["agent"] == region.agent and after.shape == before.shape and after.dtype == np.uint8
    k = 2 * editor.margin(before.shape) + 1
    inside = region.mask > 0.5
    core = cv2.erode((region.mask > 0.999).astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    assert core.sum() > 50, "the mask is too small to measure"
    assert check(before, after, inside, core)
    if action not in editor.WHOLE_FRAME and subject != "whole image":  # a local edit: the rest is untouched
        reach = (2 if action == "remove" else 1) * editor.margin(before.shape)
        near = cv2.dilate((region.mask > 0).astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)).astype(bool)
        assert np.array_equal(after[~near], before[~near])


def test_blur_background_keeps_the_person():
    before = np.asarray(builtin_image("astronaut", 256))
    after, _ = run_steps(before, [Step("blur", "background", "strongly")])
    person = regions.find(before, "person").mask > 0.95
    person = cv2.erode(person.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert person.mean() > 0.2
    assert np.abs(after[person].astype(int) - before[person]).mean() < 2


@pytest.mark.parametrize("name", ["scene0", "scene2", "scene4", "scene6"])
def test_remove_text_leaves_none_readable(name):
    before = np.asarray(builtin_image(name, 256))
    ocr = agents.agent("ocr")
    where = regions.find(before, "text").mask > 0.5

    def read_there(img):  # what RapidOCR reads with its box centred on the text's place (a circle can read as "O")
        return [t for box, t, _ in ocr(img)[0] or [] if where[tuple(np.mean(box, 0).astype(int)[::-1])]]
    assert read_there(before), "the word must be readable before"
    after, trace = run_steps(before, [Step("remove", "text", "full")])
    assert "error" not in trace[0] and trace[0]["agent"] == "text"
    assert not read_there(after)


@pytest.mark.parametrize("action,goal,expect", [
    ("rotate", "90 degrees", lambda b: np.rot90(b, -1)), ("rotate", "180 degrees", lambda b: b[::-1, ::-1]),
    ("rotate", "270 degrees", lambda b: np.rot90(b, 1)), ("flip", "horizontal", lambda b: b[:, ::-1]),
    ("flip", "vertical", lambda b: b[::-1]), ("crop", "16:9", lambda b: b[(300 - 225) // 2:][:225]),
    ("crop", "square", lambda b: b[:, 50:350]), ("crop", "4:3", lambda b: b)])
def test_geometry_is_exact(action, goal, expect):
    before = np.asarray(builtin_image("chelsea", 400))[:300]  # 400 x 300: not square, so crops differ
    after, trace = run_steps(before, [Step(action, "whole image", goal)])
    assert trace[0]["agent"] == "none" and np.array_equal(after, expect(before))


def test_multi_step_runs_in_order():
    before = np.asarray(builtin_image("scene2", 256))
    steps, how = agents.sequence({"action": ["add grain", "recolor", "crop"], "subject":
                                  ["whole image", "red circle", "whole image"], "goal": ["slightly", "blue", "16:9"]})
    after, trace = run_steps(before, steps)
    assert [r["action"] for r in trace] == ["crop", "recolor", "add grain"] and how.startswith("rules")
    assert [r["step"] for r in trace] == [1, 2, 3] and all("error" not in r for r in trace)
    assert after.shape == (144, 256, 3) and trace[1]["agent"] == "color"


def test_failed_step_is_skipped_and_reported():
    before = np.asarray(builtin_image("scene1", 128))
    after, trace = run_steps(before, [Step("teleport", "cat", "mars"), Step("remove", "unicorn", "full"),
                                      Step("flip", "whole image", "horizontal")])
    assert "has no action 'teleport'" in trace[0]["error"] and "nothing to remove" in trace[1]["error"]
    assert "error" not in trace[2] and np.array_equal(after, before[:, ::-1])
