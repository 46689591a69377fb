"""The CPU editor: each action does what its name says, only inside its mask, the same way at every size, and
bad requests fail with a message that says what is accepted."""

import cv2
import numpy as np
import pytest

import data
import editor
from editor import EditError, apply


def photo(name="astronaut", size=256):
    return np.asarray(data.builtin_image(name, size))


def box(shape, top, bottom, left, right):
    m = np.zeros(shape[:2], np.float32)
    m[top:bottom, left:right] = 1
    return m


def near(mask, reach):
    """Pixels with some mask pixel within `reach` along x and y (a square dilation)."""
    return cv2.dilate((mask > 0).astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)) > 0


def deep(mask, reach):
    """Pixels whose whole (2 reach + 1)^2 square lies in the mask."""
    return cv2.erode((mask >= 1).astype(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)) > 0


def luma(img):
    return np.asarray(img, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


STATS = {  # statistics of the pixels where `where` is True
    "luma mean": lambda im, where: luma(im)[where].mean(),
    "luma std": lambda im, where: luma(im)[where].std(),
    "saturation": lambda im, where: cv2.cvtColor(im, cv2.COLOR_RGB2HSV)[..., 1][where].mean(),
    "red - blue": lambda im, where: (im[..., 0].astype(float) - im[..., 2])[where].mean(),
    "detail": lambda im, where: cv2.Laplacian(luma(im), cv2.CV_32F)[where].var(),
}
MASK = box((256, 256), 40, 216, 60, 200)
GOALS = {a: "moderately" for a in editor.ACTIONS}  # a sensible goal for every action
GOALS.update({"grayscale": "full", "sepia": "full", "remove": "full", "recolor": "teal", "crop": "16:9",
              "rotate": "30 degrees", "flip": "horizontal", "replace background": "blurred"})
LOCAL = [a for a in editor.ACTIONS if a not in editor.WHOLE_FRAME]


def test_actions_are_the_data_actions():
    assert editor.ACTIONS == data.ACTIONS and len(editor.ACTIONS) == 22
    assert editor.GEOMETRY == ("crop", "rotate", "flip") and set(editor.WHOLE_FRAME) <= set(editor.ACTIONS)


@pytest.mark.parametrize("action, stat, sign", [
    ("brighten", "luma mean", 1), ("darken", "luma mean", -1), ("increase contrast", "luma std", 1),
    ("decrease contrast", "luma std", -1), ("saturate", "saturation", 1), ("desaturate", "saturation", -1),
    ("warm", "red - blue", 1), ("cool", "red - blue", -1), ("blur", "detail", -1), ("sharpen", "detail", 1),
    ("add grain", "detail", 1)])
def test_amount_moves_the_statistic_inside_the_mask(action, stat, sign):
    img, f = photo(), STATS[stat]
    inside = deep(MASK, editor.margin(img.shape))
    before = f(img, inside)
    slight, strong = (f(apply(img, action, g, MASK), inside) - before for g in ("slightly", "strongly"))
    assert sign * slight > 0, f"{action} slightly moved {stat} the wrong way: {slight:+.2f}"
    assert sign * strong > sign * slight, f"{action}: strongly ({strong:+.2f}) vs slightly ({slight:+.2f})"


@pytest.mark.parametrize("action", LOCAL)
def test_local_edit_leaves_the_rest_byte_identical(action):
    img = photo("chelsea")
    reach = editor.margin(img.shape) * (2 if action == "remove" else 1)  # remove grows its hole by one margin
    out = apply(img, action, GOALS[action], MASK)
    assert np.array_equal(out[~near(MASK, reach)], img[~near(MASK, reach)])
    assert not np.array_equal(out[MASK > 0], img[MASK > 0]), f"{action} changed nothing inside its mask"
    assert np.array_equal(apply(img, action, GOALS[action], np.zeros_like(MASK)), img)  # empty mask: no edit


def test_grayscale_and_sepia():
    img = photo("coffee")
    g = apply(img, "grayscale", "")
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert abs(luma(g).mean() - luma(img).mean()) < 1.5  # same brightness, no colour
    s = apply(img, "sepia", "full").astype(int)
    assert (s[..., 0] >= s[..., 1]).all() and (s[..., 1] >= s[..., 2]).all()
    assert s[..., 0].mean() > s[..., 2].mean() + 20


def scene_object():
    """A drawn scene, the mask of its first coloured shape (shades within 8 of the paint) and the shape's colour."""
    for i in range(data.N_SCENES):
        for subject in data.image_subjects(f"scene{i}"):
            name = subject.split()[0]
            if name in data.COLORS and name != "blue":
                img = photo(f"scene{i}")
                mask = (np.abs(img.astype(int) - data.COLORS[name]).max(2) <= 8).astype(np.float32)
                return img, mask, name


@pytest.mark.parametrize("goal, rgb", [("blue", (40, 80, 210)), ("Scarlet", editor.COLORS["scarlet"]),
                                       ("teal", editor.COLORS["teal"]), ("#00ff00", (0, 255, 0)),
                                       ("white", (255, 255, 255)), ("black", (0, 0, 0)), ("grey", (128, 128, 128))])
def test_recolor_a_flat_shape_takes_the_colour(goal, rgb):
    img, mask, _ = scene_object()
    out = apply(img, "recolor", goal, mask)
    inside = deep(mask, editor.margin(img.shape))
    assert inside.sum() > 200
    assert np.abs(np.median(out[inside], 0) - rgb).max() <= 3  # a flat shape: exactly the target colour
    if goal == "blue":
        hue = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[..., 0][inside]
        target = cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV)[0, 0, 0]
        assert np.abs(hue.astype(int) - target).max() <= 2, (np.unique(hue), target)
    assert np.array_equal(out[~near(mask, editor.margin(img.shape))], img[~near(mask, editor.margin(img.shape))])


def test_recolor_keeps_the_shading_of_a_photo():
    img = photo("chelsea")
    out = apply(img, "recolor", "blue", MASK)
    inside = deep(MASK, editor.margin(img.shape))
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[inside]
    blue = cv2.cvtColor(np.uint8([[[40, 80, 210]]]), cv2.COLOR_RGB2HSV)[0, 0, 0]
    assert np.median(hsv[:, 0]) == pytest.approx(blue, abs=3)
    assert np.corrcoef(luma(img)[inside], luma(out)[inside])[0, 1] > 0.8  # light and dark stay where they were


def test_denoise_flattens_noise():
    noise = np.random.default_rng(0).normal(0, 12, (128, 128, 3))
    img = np.clip(128 + noise, 0, 255).astype(np.uint8)
    before = img.std()
    assert apply(img, "denoise", "strongly").std() < 0.5 * before
    assert apply(img, "denoise", "strongly").std() < apply(img, "denoise", "slightly").std()


def test_remove_fills_with_the_backdrop():
    img = photo("scene1")  # a pink square and a purple car on a plain backdrop
    assert "pink square" in data.image_subjects("scene1")
    mask = (np.abs(img.astype(int) - data.COLORS["pink"]).max(2) <= 60).astype(np.float32)  # with its soft edge
    mask[:, 128:] = 0  # the square is in the left column; the car's soft edges are pinkish too
    out = apply(img, "remove", "", mask)
    ring = near(mask, 12) & ~near(mask, 8)  # the backdrop just around the shape
    backdrop = img[ring].astype(float).mean(0)
    assert np.abs(out[mask > 0].astype(float).mean(0) - backdrop).max() < 12, "the hole is not backdrop-coloured"
    assert np.abs(out[mask > 0].astype(int) - backdrop).max() < 40  # no trace of the shape's paint left


@pytest.mark.parametrize("hw, goal, size, top_left", [
    ((256, 256), "16:9", (144, 256), (56, 0)), ((256, 256), "9:16", (256, 144), (0, 56)),
    ((256, 256), "16 9", (144, 256), (56, 0)), ((256, 256), "a 16 x 9 frame", (144, 256), (56, 0)),
    ((200, 300), "square", (200, 200), (0, 50)), ((300, 200), "1:1", (200, 200), (50, 0)),
    ((200, 300), "4:3", (200, 267), (0, 16)), ((300, 200), "16:9", (112, 200), (94, 0)),
    ((256, 256), "portrait", (256, 192), (0, 32)), ((256, 256), "landscape", (192, 256), (32, 0))])
def test_crop_is_the_largest_centred_crop(hw, goal, size, top_left):
    img = photo("astronaut", 300)[:hw[0], :hw[1]]
    out = apply(img, "crop", goal)
    (t, l), (h, w) = top_left, size
    assert out.shape == (h, w, 3) and np.array_equal(out, img[t:t + h, l:l + w])


@pytest.mark.parametrize("goal, k", [
    ("90 degrees", -1), ("90", -1), ("clockwise", -1), ("turn right", -1), ("180", 2), ("upside down", 2),
    ("270 degrees", 1), ("-90", 1), ("counterclockwise", 1), ("90 degrees anti-clockwise", 1), ("left", 1),
    ("360 degrees", 0)])
def test_rotate_by_quarter_turns_is_exact_and_clockwise(goal, k):
    img = photo()[:, :200]  # not square, so a wrong quarter turn also has the wrong shape
    assert np.array_equal(apply(img, "rotate", goal), np.rot90(img, k))


def test_rotate_by_any_angle_turns_clockwise_on_a_larger_canvas():
    img = np.zeros((101, 101, 3), np.uint8)
    img[18:23, 48:53] = 255  # a dot straight above the centre
    out = apply(img, "rotate", "30 degrees")
    assert out.shape[0] > 101 and out.shape[0] == out.shape[1]
    ys, xs = np.nonzero(luma(out) > 128)
    c = (out.shape[1] - 1) / 2
    assert xs.mean() - c == pytest.approx(30 * np.sin(np.pi / 6), abs=1.5)  # clockwise: the top moves right
    assert ys.mean() - c == pytest.approx(-30 * np.cos(np.pi / 6), abs=1.5)


@pytest.mark.parametrize("goal, axis", [("horizontal", 1), ("horizontally", 1), ("left to right", 1), ("mirror", 1),
                                        ("", 1), ("vertical", 0), ("vertically", 0), ("upside down", 0),
                                        ("top to bottom", 0)])
def test_flip(goal, axis):
    img = photo()
    assert np.array_equal(apply(img, "flip", goal, MASK), np.flip(img, axis))  # geometry ignores the mask


def test_vignette_darkens_the_corners_not_the_centre():
    img = photo("camera")
    drops = []
    for goal in ("slightly", "strongly"):
        out = apply(img, "vignette", goal, MASK)
        assert np.array_equal(out, apply(img, "vignette", goal))  # the frame's vignette: the mask is ignored
        assert np.array_equal(out[118:138, 118:138], img[118:138, 118:138])
        drops.append(1 - luma(out)[:20, :20].mean() / luma(img)[:20, :20].mean())
    assert 0.1 < drops[0] < drops[1] < 0.8


def test_grain_is_deterministic_noise():
    flat = np.full((200, 300, 3), 128, np.uint8)
    a, b = apply(flat, "add grain", "moderately"), apply(flat, "add grain", "moderately")
    assert np.array_equal(a, b)
    assert 9 < a.astype(float).std() < 15  # about 12 grey levels
    assert (a[..., 0] == a[..., 2]).all()  # luminance grain, no colour speckle


@pytest.mark.parametrize("goal, block", [("slightly", 3), ("moderately", 6), ("strongly", 10)])
def test_pixelate_makes_constant_blocks(goal, block):
    img = photo()
    out = apply(img, "pixelate", goal)
    n = 256 // block * block
    blocks = out[:n, :n].reshape(n // block, block, n // block, block, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    masked = apply(img, "pixelate", goal, MASK)  # inside a mask: the blocks deep inside are the same blocks
    inside = deep(MASK, editor.margin(img.shape))
    assert np.array_equal(masked[inside], out[inside])


def test_replace_background_with_a_colour():
    img, background = photo(), 1 - box((256, 256), 60, 200, 70, 190)
    for goal in ("red", "a plain red backdrop", "#d72828"):
        out = apply(img, "replace background", goal, background)
        assert (out[deep(background, editor.margin(img.shape))] == (215, 40, 40)).all()
        kept = ~near(background, editor.margin(img.shape))
        assert np.array_equal(out[kept], img[kept])


def test_replace_background_blurred_only_blurs_the_background():
    img, background = photo(), 1 - box((256, 256), 60, 200, 70, 190)
    out = apply(img, "replace background", "a blurred backdrop", background)
    bg, kept = deep(background, editor.margin(img.shape)), ~near(background, editor.margin(img.shape))
    assert STATS["detail"](out, bg) < 0.1 * STATS["detail"](img, bg)
    assert np.array_equal(out[kept], img[kept])


@pytest.mark.parametrize("radius", [1, 2.56, 6])
def test_feather_reach_is_exact(radius):
    mask = box((120, 140), 30, 90, 40, 100)
    m = editor.feather(mask, radius)
    k = int(np.ceil(2 * radius))
    assert m.dtype == np.float32 and m.shape == mask.shape and m.min() >= 0 and m.max() <= 1
    assert (m[~near(mask, k)] == 0).all() and (m[deep(mask, k)] == 1).all()
    assert m[60, 39] + m[60, 40] == pytest.approx(1, abs=0.02)  # half-way where the edge is (between 39 and 40)
    assert np.array_equal(editor.feather(mask, 0), mask)


@pytest.mark.parametrize("action", editor.ACTIONS)
def test_every_action_is_deterministic_and_leaves_its_input_alone(action):
    img = photo("rocket")
    keep = img.copy()
    a, b = apply(img, action, GOALS[action], MASK), apply(img, action, GOALS[action], MASK)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and np.array_equal(a, b)
    assert np.array_equal(img, keep) and not np.shares_memory(a, img)
    if action not in ("crop", "rotate"):
        assert a.shape == img.shape


@pytest.mark.parametrize("action, goal, mask, message", [
    ("sparkle", "", None, r"unknown action 'sparkle'.*brighten, darken, increase contrast"),
    ("recolor", "sparkly", None, r"recolor: cannot read a colour in goal 'sparkly'.*scarlet.*#rrggbb"),
    ("recolor", "", None, r"recolor: cannot read a colour in goal ''"),
    ("replace background", "sparkly", None, r"replace background: cannot read a colour.*blurred"),
    ("rotate", "a bit", None, r"rotate: cannot read an angle in goal 'a bit'.*90 degrees.*counterclockwise"),
    ("flip", "diagonally", None, r"flip: cannot read a direction in goal 'diagonally'.*horizontal.*vertical"),
    ("crop", "nicely", None, r"crop: cannot read an aspect ratio in goal 'nicely'.*16:9.*square"),
    ("blur", "slightly", np.ones((10, 10)), r"mask has shape \(10, 10\), expected the image's \(H, W\) = \(256, 256\)"),
    ("blur", "slightly", np.full((256, 256), 255.0), r"mask values must lie in \[0, 1\], got 255.0..255.0"),
    ("blur", "slightly", np.full((256, 256), np.nan), r"mask values must lie in \[0, 1\], got nan"),
    ("remove", "", None, r"remove needs a region: pass the mask")])
def test_bad_requests_say_what_is_accepted(action, goal, mask, message):
    with pytest.raises(EditError, match=message):
        apply(photo(), action, goal, mask)


def test_resampling_overshoot_in_a_mask_is_clipped():
    img, overshoot = photo(), MASK * 1.05 - 0.02  # what a cubic resize of a 0/1 mask may give
    assert np.array_equal(apply(img, "blur", "", overshoot), apply(img, "blur", "", np.clip(overshoot, 0, 1)))


def test_bad_image():
    with pytest.raises(EditError, match=r"image must be a uint8 \(H, W, 3\) RGB array, got float64 \(8, 8\)"):
        apply(np.zeros((8, 8)), "blur", "")


@pytest.mark.parametrize("goal, level", [
    ("slightly", 0), ("a little", 0), ("a little too dark", 0), ("a touch", 0), ("subtle", 0), ("Light", 0),
    ("faint", 0), ("somewhat", 1), ("noticeably", 1), ("medium", 1), ("", 1), ("full", 1), ("banana", 1),
    ("too", 1), ("a lot", 2), ("much", 2), ("far too", 2), ("heavily", 2), ("Strong", 2), ("dramatic", 2),
    ("very", 2)])
def test_amount_words(goal, level):
    assert editor.amount(goal) == level


def test_amount_words_reach_the_pixels():
    img = photo()
    assert np.array_equal(apply(img, "blur", "a lot"), apply(img, "blur", "strongly"))
    assert np.array_equal(apply(img, "blur", ""), apply(img, "blur", "moderately"))


@pytest.mark.parametrize("goal, rgb", [
    ("red", (215, 40, 40)), ("a plain red backdrop", (215, 40, 40)), ("Copper", (184, 115, 51)),
    ("#0A0b0C", (10, 11, 12)), ("gray", (128, 128, 128)), ("grey", (128, 128, 128)),
    ("light blue", (126, 150, 228)), ("dark green", (24, 96, 36))])
def test_colour_words(goal, rgb):
    assert editor.color(goal) == rgb


@pytest.mark.parametrize("action, goal", [("blur", "strongly"), ("vignette", "strongly"), ("pixelate", "strongly"),
                                          ("replace background", "blurred"), ("sharpen", "moderately")])
def test_full_resolution_looks_like_the_preview(action, goal):
    """Sizes scale with the frame: a 2048x1536 edit shrunk to 512x384 is close to the same edit of a 512x384 preview
    (blurred a little before comparing, so resampling noise does not count)."""
    big = cv2.resize(photo("astronaut", 512), (2048, 1536), interpolation=cv2.INTER_CUBIC)
    small = cv2.resize(big, (512, 384), interpolation=cv2.INTER_AREA)
    mask_big = box(big.shape, 300, 1300, 400, 1700)
    mask_small = cv2.resize(mask_big, (512, 384), interpolation=cv2.INTER_AREA)
    shrunk = cv2.resize(apply(big, action, goal, mask_big), (512, 384), interpolation=cv2.INTER_AREA)
    preview = apply(small, action, goal, mask_small)
    change = np.abs(preview.astype(float) - small).mean()
    diff = np.abs(cv2.GaussianBlur(shrunk, (0, 0), 2).astype(float) - cv2.GaussianBlur(preview, (0, 0), 2)).mean()
    assert diff < 0.1 * change + 0.5, f"{action}: full-res differs from the preview by {diff:.2f} (edit {change:.2f})"


def test_full_resolution_grain_is_as_coarse_as_the_preview():
    """Grain at 2048x1536 is blurred to preview-pixel size: shrunk to 512x384 it keeps most of its strength
    (one-pixel grain would drop to a quarter)."""
    big = editor.apply(np.full((1536, 2048, 3), 128, np.uint8), "add grain", "strongly")
    assert big.std() == pytest.approx(20, abs=1)
    assert 0.7 * 20 < cv2.resize(big, (512, 384), interpolation=cv2.INTER_AREA).std() < 20


@pytest.mark.slow
@pytest.mark.parametrize("action", editor.ACTIONS)
def test_full_resolution_every_action(action):
    big = cv2.resize(photo("chelsea", 512), (2048, 1536))
    out = apply(big, action, GOALS[action], box(big.shape, 300, 1300, 400, 1700))
    assert out.dtype == np.uint8 and (out.shape == big.shape or action in ("crop", "rotate"))
