"""Region agents on the built-in images, with the real CPU models (MediaPipe, RapidOCR, OpenCV); fakes only where
the test is about the registry itself."""
import cv2
import numpy as np
import pytest

import agents
import registry
import data
import regions


@pytest.fixture(autouse=True, scope="module")
def own_registry():
    """The models this file loads live in a registry of its own: other files see agents' registry as they left it."""
    saved, registry._loaded = registry._loaded, {}
    yield
    registry._loaded = saved


def image(name, size=256):
    return np.asarray(data.builtin_image(name, size))


def iou(a, b):
    return float((a & b).sum() / max(1, (a | b).sum()))


def near(img, rgb, tol=40):
    return np.linalg.norm(img.astype(np.int32) - np.array(rgb), axis=2) < tol


def centroid(mask):
    ys, xs = np.indices(mask.shape)
    return (ys * mask).sum() / mask.sum() / mask.shape[0], (xs * mask).sum() / mask.sum() / mask.shape[1]


@pytest.mark.parametrize("subject, agent", [
    ("whole image", "whole"), ("the photo", "whole"), ("everything", "whole"), ("", "whole"),
    ("left", "frame"), ("the left side", "frame"), ("top half", "frame"), ("upper left corner", "frame"),
    ("middle", "frame"), ("the centre", "frame"), ("lower", "frame"),
    ("person", "person"), ("the woman", "person"), ("her", "person"), ("her coat", "person"),
    ("the man's hair", "person"), ("people", "person"),
    ("background", "background"), ("the backdrop", "background"), ("sky", "background"),
    ("face", "face"), ("her face", "face"), ("faces", "face"), ("head", "face"),
    ("text", "text"), ("the writing", "text"), ("sign", "text"), ("caption", "text"), ("letters", "text"),
    ("red circle", "color"), ("the blue car", "color"), ("green thing", "color"), ("Red Objects", "color"),
    ("cat", "salient"), ("the cup", "salient"), ("rocket", "salient"), ("motorcycle", "salient"),
    ("subject", "salient"), ("cars", "salient"),
    ("unicorn", "whole"), ("the flux capacitor", "whole"),
])
def test_agent_for(subject, agent):
    assert regions.agent_for(subject) == agent


@pytest.mark.parametrize("subject, rows, cols", [
    ("left", slice(None), slice(0, 128)), ("right", slice(None), slice(128, 256)),
    ("top", slice(0, 128), slice(None)), ("the bottom half", slice(128, 256), slice(None)),
    ("center", slice(64, 192), slice(64, 192)), ("top left", slice(0, 128), slice(0, 128)),
])
def test_frame_parts_are_exact(subject, rows, cols):
    want = np.zeros((256, 256), np.float32)
    want[rows, cols] = 1
    r = regions.find(image("scene1"), subject)
    assert r.agent == "frame" and r.mask.dtype == np.float32 and np.array_equal(r.mask, want)


def test_masks_have_the_image_size():
    img = image("astronaut", 512)[40:340, 10:500]  # 300 x 490, not square, not a model's size
    for subject in ("left", "person", "face", "background", "orange suit", "text", "subject", "unicorn"):
        r = regions.find(img, subject)
        assert r.mask.shape == (300, 490) and r.mask.dtype == np.float32, subject
        assert 0 <= r.mask.min() and r.mask.max() <= 1 and r.note, subject


@pytest.mark.parametrize("shape, noise", [((64, 64), True), ((1, 1), True), ((3, 700), False), ((1200, 900), False)])
def test_odd_images_never_raise(shape, noise):
    """Uniform, noisy, tiny, thin and large images: every agent answers with a mask of the image's size (often the
    whole image, with a note), and describe() answers too. A thin image once took RapidOCR minutes."""
    rng = np.random.default_rng(0)
    for img in [np.full((*shape, 3), 200, np.uint8)] + [rng.integers(0, 256, (*shape, 3), dtype=np.uint8)] * noise:
        for subject in ("left", "person", "background", "face", "text", "red circle", "cat", "unicorn"):
            r = regions.find(img, subject)
            assert r.mask.shape == shape and 0 <= r.mask.min() and r.mask.max() <= 1, subject
        assert regions.describe(img).startswith(f"{shape[1]}x{shape[0]} image")


def test_whole_and_unknown_subjects():
    img = image("scene0")
    for subject, agent in (("whole image", "whole"), ("unicorn", "whole")):
        r = regions.find(img, subject)
        assert r.agent == agent and np.all(r.mask == 1)
    assert "unicorn" in regions.find(img, "unicorn").note and "whole image" in regions.find(img, "unicorn").note
    assert regions.find(img, None).agent == "whole"  # an odd subject never raises


@pytest.mark.parametrize("bad", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                 np.zeros((8, 8, 4), np.uint8), np.zeros((0, 8, 3), np.uint8), [[0, 0, 0]]])
def test_bad_image(bad):
    with pytest.raises(ValueError, match="uint8 RGB|numpy array"):
        regions.find(bad, "left")
    with pytest.raises(ValueError, match="uint8 RGB|numpy array"):
        regions.describe(bad)


def test_astronaut_person_background_face():
    img = image("astronaut")
    person = regions.find(img, "the woman")
    assert person.agent == "person" and (person.mask > 0.5).mean() > 0.2
    cy, cx = centroid(person.mask)
    assert 0.35 < cy < 0.8 and 0.2 < cx < 0.6  # the astronaut is left of centre, below the top
    background = regions.find(img, "background")
    assert background.agent == "background" and "person" in background.note
    assert np.abs(person.mask + background.mask - 1).max() < 1e-5
    face = regions.find(img, "her face")
    assert face.agent == "face" and 0.01 < face.mask.mean() < 0.1
    cy, cx = centroid(face.mask)
    assert 0.1 < cy < 0.33 and 0.3 < cx < 0.55  # left of centre, upper third
    coat = regions.find(img, "her coat")
    assert coat.agent == "person" and "whole person" in coat.note and np.array_equal(coat.mask, person.mask)


def test_chelsea_cat_and_background():
    img = image("chelsea")
    cat = regions.find(img, "the cat")
    assert cat.agent == "salient" and cat.mask[128, 128] > 0.5 and cat.mask[150, 128] > 0.5
    assert np.array_equal(cat.mask, regions.find(img, "cat").mask)  # deterministic (grabCut's RNG is seeded)
    background = regions.find(img, "background")
    assert background.agent == "background" and np.abs(cat.mask + background.mask - 1).max() < 1e-5


def test_no_face_falls_back_to_the_whole_image():
    r = regions.find(image("scene2"), "face")
    assert r.agent == "whole" and np.all(r.mask == 1) and "no face found" in r.note


@pytest.mark.parametrize("size", [256, 512])
def test_color_objects_on_scenes(size):
    """Every coloured object of every scene: IoU with its true pixels; a car's true pixels include its wheels."""
    ious = {}
    for i in range(data.N_SCENES):
        img = image(f"scene{i}", size)
        for obj in data._scene(i)[1]:
            color, shape = obj.split()
            truth = near(img, data.COLORS[color])
            if shape == "car":  # the wheels: dark pixels inside the rows and columns the body spans, below its top
                ys, xs = np.nonzero(truth)
                box = np.zeros_like(truth)
                box[ys.min():ys.max() + size // 20, xs.min():xs.max() + 1] = True
                truth |= near(img, (30, 30, 30)) & box
            r = regions.find(img, f"the {obj}")
            assert r.agent == "color", r.note
            ious[f"scene{i} {obj}"] = iou(r.mask > 0.5, truth)
    print(size, {k: round(v, 3) for k, v in ious.items()})
    assert min(ious.values()) > 0.93, ious


def test_plural_and_missing_colors():
    img = image("scene5")  # pink car, red car, blue circle on a dusk backdrop
    one = regions.find(img, "red car")
    assert regions.find(img, "red cars").mask.sum() >= one.mask.sum()
    missing = regions.find(img, "green thing")  # no green: the largest drawn shape instead
    assert missing.agent == "salient" and "no green" in missing.note
    assert iou(missing.mask > 0.5, near(img, data.COLORS["blue"])) > 0.9


def test_text_on_scenes():
    """A word is covered; blanked with the backdrop's median colour, RapidOCR reads nothing there any more."""
    ocr = agents.agent("ocr")
    for i in range(data.N_SCENES):
        img, (backdrop, _, word) = image(f"scene{i}"), data._scene(i)
        r = regions.find(img, "the text")
        if not word:
            assert r.agent == "whole" and "no text found" in r.note and np.all(r.mask == 1)
            continue
        assert r.agent == "text" and word.upper() in r.note and r.mask.mean() < 0.15
        ink = near(img, (255, 255, 255) if backdrop == "dusk" else (20, 20, 20), 60)
        ink[64:] = False  # the word is in the top quarter
        assert (r.mask[ink] > 0.5).all()
        out = img.copy()
        out[r.mask > 0.5] = np.median(img[:64][r.mask[:64] < 0.5], axis=0)
        boxes = np.zeros(img.shape[:2], np.uint8)
        for box, text, _ in ocr(out)[0] or []:  # it may still read "■" off a drawn square, away from the word
            cv2.fillPoly(boxes, [np.asarray(box, np.int32)], 1)
            assert word not in text.lower()
        assert not (boxes & (r.mask > 0.5)).any()


def test_lazy_loading(monkeypatch):
    monkeypatch.setattr(registry, "_loaded", {})  # a fresh registry; the real one comes back after the test
    regions.find(image("astronaut"), "left")
    regions.find(image("astronaut"), "red circle")
    regions.agent_for("face")
    assert agents.loaded() == []
    regions.find(image("astronaut"), "face")
    assert agents.loaded() == ["face"]  # MediaPipe found it: no Haar cascade
    regions.find(image("scene0"), "face")
    assert agents.loaded() == ["face", "haar"]
    monkeypatch.setattr(registry, "_loaded", {})
    regions.find(image("scene0"), "background")  # no person in the selfie mask: no face agent; drawn: no saliency
    assert agents.loaded() == ["selfie"]


def test_fake_face_agent(monkeypatch):
    class Box:
        xmin, ymin, width, height = 0.5, 0.5, 0.25, 0.25

    class Detection:
        score, location_data = [0.9], type("L", (), {"relative_bounding_box": Box})

    class Fake:
        def process(self, rgb):
            return type("R", (), {"detections": [Detection]})

    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setitem(agents.LOADERS, "face", Fake)
    r = regions.find(image("scene0"), "face")
    assert r.agent == "face" and agents.loaded() == ["face"]
    assert r.mask[160, 160] == pytest.approx(1) and r.mask[20, 20] == 0


def test_describe():
    text = regions.describe(image("astronaut"))
    assert "a person" in text and "1 face" in text and len(text) < 300
    assert text == regions.describe(image("astronaut"))
    for i in range(data.N_SCENES):
        _, objects, word = data._scene(i)
        text = regions.describe(image(f"scene{i}"))
        assert len(text) < 300 and "no person" in text and "0 faces" in text
        assert (word.upper() in text) if word else ("text:" not in text), text
        assert all(obj.split()[0] in text for obj in objects), text
