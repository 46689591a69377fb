"""
The CPU editing agent: plain, deterministic image operations, no weights.

    import editor
    out = editor.apply(image, "recolor", "scarlet", mask)   # image: uint8 (H, W, 3) RGB; mask: (H, W) in [0, 1]

`apply` never changes `image`; it returns a new uint8 array. `mask` None means the whole image. A local action
computes the edited frame E and blends it in, out = image + (E - image) * feather(mask): pixels more than
`margin(shape)` pixels (along x or y) from the mask come back byte-identical (2 * margin for remove, whose hole is
grown by one margin), pixels that deep inside it get the full edit. Geometry (crop, rotate, flip) and vignette act on
the whole frame and ignore the mask. Sizes (blur sigma, pixel blocks, grain, feather) are fractions of the shorter
side, so a 4000 px photo gets the same-looking edit as a 512 px preview. Same inputs, same bytes: grain draws from
a generator seeded by the image shape.

Goals are free text, read leniently. Amounts: slightly ("a little", "a bit", "a touch", "subtle", "light",
"faint", "mild"...), moderately ("somewhat", "noticeably", "medium"...; also "", "full" and anything unreadable),
strongly ("a lot", "much", "heavily", "strong", "dramatic", "very", "far"...); the first amount word wins.

    brighten, darken       gamma curve on every channel (gamma 0.85/0.7/0.5 or 1.2/1.45/1.9)
    increase/decrease      stretch or squeeze each pixel around the mean luminance of the masked region
      contrast             (x1.2/1.45/1.9 or x0.8/0.6/0.4)
    saturate, desaturate   push colours from or toward their own grey (x1.3/1.7/2.2 or x0.7/0.45/0.2)
    grayscale, sepia       Rec.601 luminance on three channels; the classic sepia matrix. Goal ignored.
    warm, cool             red gain up and blue gain down by 6/12/20 % (cool: the reverse)
    recolor                a colour: a name (COLORS, ~35 of them, "light"/"dark" before one) or "#rrggbb". In
                           CIELAB the masked pixels take the colour's a, b and their lightness is shifted so its
                           mean is the colour's: shading survives, white/black/gray work the same way.
    blur, sharpen          Gaussian blur, sigma 1.5/3/6 px at 512; unsharp mask (amount 0.6/1.2/2, sigma 1.5 px)
    denoise                OpenCV non-local means, h 5/9/15 (7 px patches, 9 px search: 0.3-0.6 s per Mpx)
    remove                 needs a mask. Telea inpainting of mask > 0.5 grown by the feather margin, so the
                           object's own edge is replaced too; done at preview size (shorter side <= 512) and
                           upsampled, so large photos cost the same. Goal ignored.
    crop                   the largest centred crop of a ratio: "16:9", "4 x 3", "16 9", "square" (1:1),
                           "portrait" (3:4), "landscape" (4:3), "widescreen" (16:9); sizes rounded to pixels.
    rotate                 degrees; a positive angle turns CLOCKWISE, as people mean "rotate 90 degrees".
                           "counterclockwise", "anticlockwise", "left" negate it; "clockwise"/"right" alone = 90,
                           "upside down"/"half turn" = 180. Multiples of 90 are exact (np.rot90); other angles
                           grow the canvas to hold the whole turned frame, corners filled by edge replication.
    flip                   "horizontal"/"mirror"/"left to right" (or no goal) = left-right; "vertical"/"upside
                           down"/"top to bottom" = up-down.
    vignette               radial darkening toward the corners, down to 30/50/75 % less light there.
    add grain              luminance Gaussian noise, std 6/12/20 grey levels, grains about a pixel at 512 px.
    pixelate               mosaic of blocks 6/12/20 px at 512 (at least 2 px), aligned to the top-left corner.
    replace background     mask = the background. A colour (as recolor) fills it; "blurred"/"blur"/"bokeh"
                           blurs it (sigma 3 % of the shorter side) with the foreground left out of the average.

Simplified: no learned model anywhere; recolor treats an object as one colour; remove fills holes by diffusion,
not by inventing texture; the feather is a Gaussian of fixed width, not an edge-aware matte.
"""
import math
import re

import cv2
import numpy as np

from data import COLORS as _DATA_COLORS
from plan import ACTIONS as _PLAN_ACTIONS

ACTIONS = list(_PLAN_ACTIONS)  # the 22 canonical actions, in plan.py's order
GEOMETRY = ("crop", "rotate", "flip")  # change the whole frame, ignore the mask
WHOLE_FRAME = GEOMETRY + ("vignette",)  # ignore the mask too (a vignette belongs to the frame, not a region)


class EditError(ValueError):
    """An edit the CPU editor cannot do: unknown action, unreadable goal, bad image or mask."""


# ----------------------------------------------------------------------------------------------------------------
# Reading goals

AMOUNT_WORDS = (  # slightly, moderately, strongly; phrases before their own words ("a lot" before "lot")
    "slightly, slight, a little, little, a bit, bit, a touch, touch, subtle, subtly, light, lightly, faint, faintly, "
    "mild, mildly, gentle, gently, barely, small",
    "moderately, moderate, somewhat, noticeably, noticeable, medium, rather, fairly",
    "strongly, strong, a lot, lots, lot, much, heavily, heavy, dramatic, dramatically, very, far, way, extremely, "
    "intense, intensely, greatly, significantly, really")
_PHRASES = sorted(((p, i) for i, words in enumerate(AMOUNT_WORDS) for p in words.split(", ")), key=lambda x: -len(x[0]))
_AMOUNT_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p, _ in _PHRASES) + r")\b")
_LEVEL = dict(_PHRASES)
STRENGTH = {  # (slightly, moderately, strongly); the docstring says what each number means
    "brighten": (0.85, 0.7, 0.5), "darken": (1.2, 1.45, 1.9), "increase contrast": (1.2, 1.45, 1.9),
    "decrease contrast": (0.8, 0.6, 0.4), "saturate": (1.3, 1.7, 2.2), "desaturate": (0.7, 0.45, 0.2),
    "warm": (0.06, 0.12, 0.2), "cool": (-0.06, -0.12, -0.2), "blur": (1.5, 3, 6), "sharpen": (0.6, 1.2, 2.0),
    "denoise": (5, 9, 15), "vignette": (0.3, 0.5, 0.75), "add grain": (6, 12, 20), "pixelate": (6, 12, 20)}

COLORS = dict(  # data.py's seven (the shapes are drawn in them), then common names
    _DATA_COLORS, scarlet=(230, 30, 20), crimson=(190, 20, 50), maroon=(120, 20, 30), copper=(184, 115, 51),
    brown=(130, 80, 40), tan=(210, 180, 140), beige=(225, 205, 165), cream=(250, 240, 210), gold=(230, 180, 30),
    golden=(230, 180, 30), olive=(128, 128, 0), lime=(120, 220, 40), mint=(150, 230, 180), teal=(0, 128, 128),
    turquoise=(64, 224, 208), cyan=(0, 200, 220), aqua=(0, 200, 220), navy=(20, 30, 110), indigo=(75, 0, 130),
    violet=(140, 80, 220), lavender=(180, 160, 230), magenta=(220, 0, 180), coral=(250, 128, 100),
    salmon=(250, 128, 114), white=(255, 255, 255), black=(0, 0, 0), gray=(128, 128, 128), grey=(128, 128, 128),
    silver=(192, 192, 192))


COLOR_ACTIONS = ("recolor", "replace background")  # the actions whose goal is a colour (`color`)


def goal_choices(action):
    """The goals a constrained planner may write for `action` (rollout.PlanGrammar), canonical short words first,
    then every other goal of that form the readers below take: any whole angle (1..359 degrees, optionally
    "clockwise"/"counterclockwise"), any ratio W:H with W and H in 1..21, every colour name with or without
    "light"/"dark". COLOR_ACTIONS also take any lower-case "#rrggbb": 16.7M of them, so the grammar checks their
    pattern instead of listing them. The readers take much more free text; this is what a small model picks from."""
    if action in STRENGTH:
        return ["slightly", "moderately", "strongly"]
    if action in COLOR_ACTIONS:
        shades = [f"{shade} {c}" for shade in ("light", "dark") for c in COLORS]
        return list(COLORS) + ["blurred"] * (action == "replace background") + shades
    if action == "crop":
        ratios = [f"{w}:{h}" for w in range(1, 22) for h in range(1, 22)]
        return list(dict.fromkeys(["square", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3"] + ratios))
    if action == "rotate":
        turns = [f"{n} degrees{way}" for way in ("", " clockwise", " counterclockwise") for n in range(1, 360)]
        return list(dict.fromkeys(["90 degrees", "180 degrees", "270 degrees"] + turns))
    return {"flip": ["horizontal", "vertical"]}.get(action, ["full"])  # grayscale, sepia, remove: no parameter


def amount(goal):
    """0, 1, 2 for slightly, moderately, strongly. The first amount word in the goal wins; none -> moderately."""
    m = _AMOUNT_RE.search(str(goal).lower())
    return _LEVEL[m.group(1)] if m else 1


def color(goal, action="recolor"):
    """'scarlet', 'a plain light blue backdrop', '#D72828' -> (r, g, b). 'light'/'pale' mix 40 % white in,
    'dark'/'deep' keep 60 % of the colour."""
    text = str(goal).lower()
    if m := re.search(r"#([0-9a-f]{6})\b", text):
        return tuple(int(m.group(1)[i:i + 2], 16) for i in (0, 2, 4))
    words = re.findall(r"[a-z]+", text)
    for i, w in enumerate(words):
        if w in COLORS:
            rgb, before = np.array(COLORS[w], float), words[i - 1] if i else ""
            rgb = rgb * 0.6 + 102 if before in ("light", "pale") else rgb * 0.6 if before in ("dark", "deep") else rgb
            return tuple(int(round(v)) for v in rgb)
    extra = ', "blurred"' if action == "replace background" else ""
    raise EditError(f"{action}: cannot read a colour in goal {goal!r}; accepted: {', '.join(COLORS)}, "
                    f"'light'/'dark' + a colour, or '#rrggbb'{extra}")


def angle(goal):
    """Degrees, positive = clockwise: '90 degrees' -> 90, 'counterclockwise' -> -90, 'upside down' -> 180."""
    text = str(goal).lower()
    ccw = re.search(r"(counter|anti)[\s-]*clock|\bccw\b|\bleft\b", text)
    if m := re.search(r"[-+]?\d+(?:\.\d+)?", text):
        a = float(m.group())
    elif re.search(r"upside|half", text):
        a = 180.0
    elif ccw or re.search(r"clockwise|\bcw\b|\bright\b|quarter", text):
        a = 90.0
    else:
        raise EditError(f"rotate: cannot read an angle in goal {goal!r}; accepted: '90 degrees', '-90', '45', "
                        "'180', '270 degrees', 'clockwise', 'counterclockwise', 'left', 'right', 'upside down'")
    return -a if ccw else a


def flip_axis(goal):
    """0 for up-down ('vertical', 'upside down'), 1 for left-right ('horizontal', 'mirror', or no goal)."""
    text = str(goal).lower()
    if re.search(r"vertic|upside|top|bottom|up.?down", text):
        return 0
    if re.search(r"horizont|left|right|mirror|sideways", text) or not text.strip():
        return 1
    raise EditError(f"flip: cannot read a direction in goal {goal!r}; accepted: 'horizontal', 'horizontally', "
                    "'left to right', 'mirror', 'vertical', 'vertically', 'upside down', 'top to bottom'")


def ratio(goal):
    """Width / height: '16:9' -> 1.777..., '4 x 3', '16 9', 'square', 'portrait' (3:4), 'landscape' (4:3)."""
    text = str(goal).lower()
    if m := re.search(r"(\d+(?:\.\d+)?)(?:\s*(?:[:x×/]|by|to)\s*|\s+)(\d+(?:\.\d+)?)", text):
        w, h = float(m.group(1)), float(m.group(2))
        if w > 0 and h > 0:
            return w / h
    for word, r in (("square", 1.0), ("portrait", 3 / 4), ("landscape", 4 / 3), ("widescreen", 16 / 9)):
        if word in text:
            return r
    raise EditError(f"crop: cannot read an aspect ratio in goal {goal!r}; accepted: 'W:H' such as '16:9', '4:3', "
                    "'1:1', '9:16', '4 x 3', or 'square', 'portrait', 'landscape', 'widescreen'")


# ----------------------------------------------------------------------------------------------------------------
# Masks

def feather_radius(shape):
    """The feather's Gaussian sigma in pixels: 1 % of the shorter side, at least 1."""
    return max(1.0, 0.01 * min(shape[:2]))


def margin(shape):
    """How far (pixels, along x or y) an edit of this image reaches beyond its mask: ceil(2 * feather radius)."""
    return math.ceil(2 * feather_radius(shape))


def feather(mask, radius):
    """Soften a (H, W) mask in [0, 1]: a Gaussian of sigma `radius`, truncated at k = ceil(2 * radius) pixels.
    Truncation makes the reach exact: a pixel with no mask pixel within k along x and y gets exactly 0, one with
    only ones within k gets exactly 1 (values within 1/1024 of 0 or 1 are snapped, below half a grey level)."""
    m = np.clip(np.asarray(mask, np.float32), 0, 1)
    if radius <= 0:
        return m
    k = math.ceil(2 * radius)
    soft = cv2.GaussianBlur(m, (2 * k + 1, 2 * k + 1), radius, borderType=cv2.BORDER_REPLICATE)
    soft[soft < 1 / 1024] = 0
    soft[soft > 1 - 1 / 1024] = 1
    return soft


# ----------------------------------------------------------------------------------------------------------------
# Edits

def _u8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _luma(x):
    return np.asarray(x, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # Rec.601, (H, W)


def _blur(x, sigma):
    """Gaussian blur. A wide one runs on a copy shrunk to sigma 4 px and is scaled back: the same look (the shrink
    adds a box of variance f^2/12, under 1 %), at a fraction of the cost on a large photo."""
    x, f = np.asarray(x, np.float32), sigma / 4
    if f <= 2:
        return cv2.GaussianBlur(x, (0, 0), sigma)
    h, w = x.shape[:2]
    small = cv2.resize(x, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), 4), (w, h), interpolation=cv2.INTER_LINEAR)


def _mean(x, mask):
    """The mean of (H, W) x over the mask, weighted by it; over the frame when there is no mask or it is empty."""
    return float((x * mask).sum() / mask.sum()) if mask is not None and mask.sum() > 0 else float(x.mean())


def _recolor(img, rgb, mask):
    lab, target = (cv2.cvtColor(np.asarray(a, np.float32) / 255, cv2.COLOR_RGB2Lab)  # L 0..100, a and b ~ +-128
                   for a in (img, np.reshape(rgb, (1, 1, 3))))
    lab[..., 0] = np.clip(lab[..., 0] - _mean(lab[..., 0], mask) + target[0, 0, 0], 0, 100)
    lab[..., 1:] = target[0, 0, 1:]
    return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * 255


def _rotate(img, deg):
    deg %= 360
    if deg % 90 == 0:
        return np.rot90(img, -int(deg // 90)).copy()  # np.rot90 turns counterclockwise for k > 0
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -deg, 1.0)  # OpenCV: positive = counterclockwise
    c, s = abs(rot[0, 0]), abs(rot[0, 1])
    nw, nh = round(h * s + w * c), round(h * c + w * s)  # the bounding box of the turned frame
    rot[:, 2] += ((nw - w) / 2, (nh - h) / 2)
    return cv2.warpAffine(img, rot, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _crop(img, r):
    h, w = img.shape[:2]
    cw, ch = (max(1, round(h * r)), h) if w / h > r else (w, max(1, round(w / r)))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top:top + ch, left:left + cw].copy()


def _vignette(img, strength):
    h, w = img.shape[:2]
    y, x = np.ogrid[:h, :w]
    r = np.sqrt(((x - (w - 1) / 2) / (w / 2)) ** 2 + ((y - (h - 1) / 2) / (h / 2)) ** 2) / math.sqrt(2)  # 1 at corners
    gain = 1 - strength * np.clip((r - 0.3) / 0.7, 0, 1) ** 2  # untouched centre, smooth fall-off to the corners
    return img * gain[..., None].astype(np.float32)


def _grain(img, std, scale):
    h, w = img.shape[:2]
    rng = np.random.default_rng([h, w, 3])  # seeded by the shape: the same photo always gets the same grain
    noise = rng.standard_normal((h, w), dtype=np.float32)
    if scale > 1:  # grains as big, relative to the frame, as one pixel of a 512 px preview
        noise = _blur(noise, 0.5 * scale)
        noise /= noise.std() + 1e-6
    return img + std * noise[..., None]


def _pixelate(img, block):
    h, w = img.shape[:2]
    ph, pw = -h % block, -w % block  # pad to whole blocks by repeating the edge, then average each block
    x = np.pad(img.astype(np.float32), ((0, ph), (0, pw), (0, 0)), mode="edge")
    means = x.reshape(x.shape[0] // block, block, x.shape[1] // block, block, 3).mean((1, 3))
    return np.repeat(np.repeat(_u8(means), block, 0), block, 1)[:h, :w]


def _inpaint(img, hole, scale):
    h, w = img.shape[:2]
    f = max(1.0, scale)  # work at preview size: Telea's cost grows with hole area, its fill is smooth anyway
    size = (max(1, round(w / f)), max(1, round(h / f)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA) if f > 1 else img
    small_hole = (cv2.resize(hole.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    fill = cv2.inpaint(small, small_hole, 3, cv2.INPAINT_TELEA)
    fill = cv2.resize(fill, (w, h), interpolation=cv2.INTER_LINEAR) if f > 1 else fill
    return np.where(hole[..., None], fill, img)


def _edit(img, action, goal, mask):
    """The edited full frame E (float or uint8, any range; clipped by the caller)."""
    scale = min(img.shape[:2]) / 512  # 1 at the 512 px preview the sizes are tuned on
    p = STRENGTH[action][amount(goal)] if action in STRENGTH else None
    x = img.astype(np.float32)
    if action in ("brighten", "darken"):
        return (255 * (np.arange(256, dtype=np.float32) / 255) ** p)[img]  # a table: one power per grey level
    if action in ("increase contrast", "decrease contrast"):
        mean = _mean(_luma(x), mask)
        return mean + (x - mean) * p
    if action in ("saturate", "desaturate"):
        grey = _luma(x)[..., None]
        return grey + (x - grey) * p
    if action == "grayscale":
        return np.repeat(_luma(x)[..., None], 3, 2)
    if action == "sepia":
        return x @ np.array([[.393, .769, .189], [.349, .686, .168], [.272, .534, .131]], np.float32).T
    if action in ("warm", "cool"):
        return x * np.array([1 + p, 1, 1 - p], np.float32)
    if action == "recolor":
        return _recolor(img, color(goal), mask)
    if action == "blur":
        return _blur(x, p * scale)
    if action == "sharpen":
        return x + p * (x - _blur(x, max(0.8, 1.5 * scale)))
    if action == "denoise":
        return cv2.fastNlMeansDenoisingColored(img, None, p, p, 7, 9)
    if action == "vignette":
        return _vignette(x, p)
    if action == "add grain":
        return _grain(x, p, scale)
    if action == "pixelate":
        return _pixelate(img, max(2, round(p * scale)))
    if action == "replace background":
        if re.search(r"blur|bokeh|defocus|out of focus", str(goal).lower()):
            sigma = 0.03 * min(img.shape[:2])
            if mask is None:
                return _blur(x, sigma)
            # Average only background pixels, so the subject does not bleed a halo into its own backdrop.
            num, den = _blur(x * mask[..., None], sigma), _blur(mask, sigma)[..., None]
            return np.where(den > 1e-3, num / np.maximum(den, 1e-3), x)
        return np.broadcast_to(np.array(color(goal, action), np.float32), x.shape)
    raise AssertionError(action)  # every action is handled above or in apply()


def check(image, mask):
    """The image as a contiguous uint8 (H, W, 3) array and the mask as float32 (H, W) in [0, 1] (or None);
    EditError for anything else. Shared by every editing agent."""
    img = np.ascontiguousarray(image)  # OpenCV wants contiguous memory (a flipped view is not)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
        raise EditError(f"image must be a uint8 (H, W, 3) RGB array, got {img.dtype} {img.shape}")
    if mask is not None:
        mask = np.asarray(mask, np.float32)
        if mask.shape != img.shape[:2]:
            raise EditError(f"mask has shape {mask.shape}, expected the image's (H, W) = {img.shape[:2]}")
        if not (mask.min() >= -0.1 and mask.max() <= 1.1):  # also catches NaN
            raise EditError(f"mask values must lie in [0, 1], got {mask.min()}..{mask.max()} (a 0/255 mask? / 255)")
        mask = np.clip(mask, 0, 1)  # a cubic resize overshoots a little; that is not worth an error
    return img, mask


def apply(image, action, goal, mask=None):
    """Apply one edit. image: uint8 (H, W, 3) RGB; action: one of ACTIONS; goal: free text (see the module
    docstring); mask: (H, W) in [0, 1] (up to 0.1 beyond is clipped) or None for the whole image. Returns a new
    uint8 (H', W', 3) array.
    Raises EditError for an unknown action, an unreadable goal, a malformed image or mask, remove without a mask."""
    if action not in ACTIONS:
        raise EditError(f"unknown action {action!r}; the CPU editor does: {', '.join(ACTIONS)}")
    img, mask = check(image, mask)
    if action == "crop":
        return _crop(img, ratio(goal))
    if action == "rotate":
        return _rotate(img, angle(goal))
    if action == "flip":
        return img[::-1].copy() if flip_axis(goal) == 0 else img[:, ::-1].copy()
    if action in WHOLE_FRAME:
        mask = None
    if action == "remove":
        if mask is None:
            raise EditError("remove needs a region: pass the mask of what to remove (None would erase everything)")
        grow = 2 * margin(img.shape) + 1  # the hole reaches a margin past the object: its edge is fully replaced
        mask = cv2.dilate((mask > 0.5).astype(np.uint8), np.ones((grow, grow), np.uint8)).astype(np.float32)
        edited = _inpaint(img, mask > 0, min(img.shape[:2]) / 512)
    else:
        edited = _u8(_edit(img, action, goal, mask))
    if mask is None:
        return edited
    m = feather(mask, feather_radius(img.shape))[..., None]
    return _u8(img + (edited.astype(np.float32) - img) * m)  # m == 0 gives img exactly, m == 1 gives edited
