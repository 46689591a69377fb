"""
Data: built-in images, synthetic edit requests with gold labels, and dataset folders.

    python data.py                 # print a few samples of each split
    python data.py data/builtin    # write data/builtin/train and data/builtin/test as dataset folders

Images: photos that scikit-image ships inside its wheel (no download) and 8 drawn scenes (`scene0`..`scene7`: a
backdrop, 1-3 shapes in named colours, sometimes a word), each with the subjects that make sense on it.
A sample: {"image": "chelsea", "instruction": "Make the cat much brighter and blur the background a little",
"action": ["brighten", "blur"], "subject": ["cat", "background"], "goal": ["strongly", "slightly"],
"template": "brighten/1+blur/0"}, 1-3 edits aligned by position. Half the requests are one edit, 2/5 join
2-3 edits, 1/10 are composites: one indirect phrase meaning several edits ("make it look like an old photograph").

The test split measures generalisation, not memory:
  - templates: every third template of an action (index % 3 == 2) is test-only, the rest train-only;
  - combinations: a request of 2-3 edits (random or composite) belongs to the split given by a stable hash
    (zlib.crc32, not Python's salted hash()) of its sorted actions, about a third to test; so some composites are
    test-only (dreamy, noir, night), and no combination of actions in test is ever seen in train;
  - single edits occur in both splits, each only through its split's templates.
`TEMPLATE_SPLIT` gives the split of every template id; `sample["template"]` names those that made a sample.
Simplified: requests come from templates, not people, and share one small vocabulary with the CPU editor.

Folders follow the Hugging Face image-folder convention: `img/0000.png` ... and `metadata.jsonl`, one {"file_name",
"instruction", "action", "subject", "goal", "target_file_name"} object per line (labels, target optional).
"""
import functools
import json
import os
import pathlib
import random
import re
import sys
import zlib

from PIL import Image, ImageDraw, ImageFont, ImageOps

from plan import ACTIONS, normalize

LABELS = ("action", "subject", "goal")


class DataError(ValueError):
    """Bad input to this file: an unknown name, a broken dataset folder, an unreadable image."""


# ----------------------------------------------------------------------------------------------------------------
# Images

REGIONS = ["whole image", "left", "right", "top", "bottom", "center"]  # every image has these
PHOTOS = {"astronaut": ["person", "face", "background"], "chelsea": ["cat", "background"],  # name -> what is on it
          "coffee": ["cup", "background"], "rocket": ["rocket", "background"],
          "motorcycle_left": ["motorcycle", "background"], "camera": ["person", "background"],
          "hubble_deep_field": [], "page": ["text"], "text": ["text"]}
COLORS = {"red": (215, 40, 40), "orange": (240, 140, 20), "yellow": (240, 210, 30), "green": (40, 160, 60),
          "blue": (40, 80, 210), "purple": (130, 50, 170), "pink": (240, 120, 180)}  # shapes are drawn in these
SHAPES = ["circle", "square", "triangle", "car"]
WORDS = ["sale", "hello", "open", "stop", "cafe", "exit", "taxi", "news"]
N_SCENES = 8


def image_names():
    return list(PHOTOS) + [f"scene{i}" for i in range(N_SCENES)]


@functools.lru_cache(maxsize=None)
def _scene(i):
    """The plan of drawn scene i: (backdrop, ("red circle", ...), word or None). Seeded by i, so fixed forever."""
    rng = random.Random(f"scene{i}")
    colors = rng.sample(list(COLORS), 1 + i % 3)  # distinct colours, so every object has a unique name
    objects = tuple(f"{c} {rng.choice(SHAPES)}" for c in colors)
    return ["sky", "plain", "dusk"][i % 3], objects, (rng.choice(WORDS) if i % 2 == 0 else None)


def image_subjects(name):
    """Subjects that make sense on a built-in image, as a list (a set would iterate in a salted, varying order)."""
    if name in PHOTOS:
        return REGIONS + PHOTOS[name]
    if name in image_names():
        _, objects, word = _scene(int(name[5:]))
        return REGIONS + ["background", *objects] + (["text"] if word else [])
    raise DataError(f"unknown built-in image {name!r}; choose from: {', '.join(image_names())}")


def _draw_scene(i, w=512):
    backdrop, objects, word = _scene(i)
    rng = random.Random(f"layout{i}")
    img = Image.new("RGB", (w, w))
    d = ImageDraw.Draw(img)
    # Muted backdrops, so that the saturated shapes stand apart (CPU region agents may find them by colour).
    top, bottom = {"sky": ((170, 205, 235), (235, 240, 245)), "plain": ((232, 226, 214), (232, 226, 214)),
                   "dusk": ((25, 30, 60), (85, 80, 105))}[backdrop]
    for y in range(w):
        d.line([(0, y), (w, y)], fill=tuple(round(a + (b - a) * y / (w - 1)) for a, b in zip(top, bottom)))
    if backdrop == "sky":
        d.rectangle([0, int(w * 0.7), w, w], fill=(150, 150, 145))  # ground
    slot = w // len(objects)  # one column per object, so they never overlap
    for k, obj in enumerate(objects):
        color, shape = obj.split()
        r, fill = rng.randint(w // 10, min(slot // 2 - 8, w // 5)), COLORS[color]
        cx, cy = slot * k + slot // 2, rng.randint(int(w * 0.55), int(w * 0.75))
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        else:  # car: body, cabin, two wheels
            d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 2], fill=fill)
            d.rectangle([cx - r // 2, cy - r, cx + r // 2, cy - r // 3], fill=fill)
            for wx in (cx - r // 2, cx + r // 2):
                d.ellipse([wx - r // 4, cy + r // 4, wx + r // 4, cy + 3 * r // 4], fill=(30, 30, 30))
    if word:
        ink = (255, 255, 255) if backdrop == "dusk" else (20, 20, 20)
        d.text((w // 2, w // 10), word.upper(), ink, ImageFont.load_default(size=w // 7), anchor="mt")  # top centre
    return img


@functools.lru_cache(maxsize=64)
def _builtin(name, size):
    if name in PHOTOS:
        try:
            from skimage import data  # only the photos need scikit-image
        except ImportError as e:
            raise ImportError("the built-in photos need scikit-image: pip install scikit-image") from e
        arr = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
        img = Image.fromarray(arr).convert("RGB")  # camera, page and text are grey
    else:
        img = _draw_scene(int(name[5:]))
    s = min(img.size)  # centre crop to a square, then resize
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.LANCZOS)


def builtin_image(name, size=256):
    """A built-in image, RGB, size x size. Deterministic; a fresh copy each call (callers may draw on it)."""
    image_subjects(name)  # raises DataError for an unknown name
    if not isinstance(size, int) or size < 1:
        raise DataError(f"image size must be a positive int, got {size!r}")
    return _builtin(name, size).copy()


def open_image(path):
    """Open an image file upright (EXIF orientation applied), fully loaded, in its own mode. An animated or
    multi-page file gives its first frame."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a folder, not an image file")
    if not p.exists():
        raise DataError(f"image {p} not found")
    if not p.is_file():
        raise DataError(f"{p} is not a regular file (a device, pipe or socket), not an image file")
    if p.stat().st_size == 0:
        raise DataError(f"{p} is empty (0 bytes), not an image")
    try:
        with Image.open(p) as im:
            im.load()  # Image.open is lazy: without this a truncated file would fail later, far from its name
            return ImageOps.exif_transpose(im)
    except Image.UnidentifiedImageError as e:
        raise DataError(f"{p} is not an image PIL can read") from e
    except Image.DecompressionBombError as e:
        raise DataError(f"{p} is too large to open safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{p}: cannot read image (truncated or corrupt): {e}") from e


def to_rgb(im):
    """Any PIL mode -> (RGB image, alpha channel as an "L" image or None). 16-bit and float greys are scaled to
    8 bits by their range (a plain convert("RGB") clips them to white); palette and grey-with-alpha images keep
    their transparency; CMYK goes through PIL's conversion."""
    import numpy as np
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 255.0 if a.max() <= 255 else 65535.0 if a.max() <= 65535 else a.max()
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    alpha = im.getchannel("A") if im.mode == "RGBA" else None
    return im.convert("RGB"), alpha


def load_image(path):
    """Open an image file as RGB, upright per its EXIF orientation. Fully loaded, so a truncated file fails here."""
    return to_rgb(open_image(path))[0]


def sample_image(s, size):
    """A request's image (PIL, RGB): its file (`image_path`), or its built-in image drawn at `size` pixels a side."""
    return load_image(s["image_path"]) if "image_path" in s else builtin_image(s["image"], size)


# ----------------------------------------------------------------------------------------------------------------
# Requests

AMOUNTS = ["slightly", "moderately", "strongly"]
GOALS = {a: AMOUNTS for a in ACTIONS}
GOALS.update({a: ["full"] for a in ("grayscale", "sepia", "remove")})  # actions without a parameter
GOALS.update(recolor=[*COLORS, "scarlet", "copper", "teal", "white", "black"], crop=["square", "16:9", "4:3"],
             rotate=["90 degrees", "180 degrees", "270 degrees"], flip=["horizontal", "vertical"])
GOALS["replace background"] = GOALS["recolor"] + ["blurred"]

# Ways to say an amount, by slot: {amt} after a verb, {cmp} before a comparative, {too} in a complaint, {adj} before
# a noun. A template holds at most one of them.
SAY = {"amt": (["a little", "a touch", "slightly", "a bit"], ["moderately", "somewhat", "noticeably"],
               ["a lot", "heavily", "strongly", "dramatically"]),
       "cmp": (["a little", "a bit", "slightly", "a touch"], ["somewhat", "noticeably"],
               ["much", "a lot", "far", "way"]),
       "too": (["a little too", "a bit too", "slightly too"], ["too", "rather too"],
               ["far too", "way too", "much too"]),
       "adj": (["subtle", "light", "faint"], ["moderate", "medium", "noticeable"], ["strong", "heavy", "dramatic"])}
# Ways to say other subjects and goals; the rest are said as they are ("the cat", "red", "16:9").
WORDS_FOR = {"whole image": ["the image", "the photo", "the picture"], "text": ["the text", "the writing"],
             "center": ["the center", "the middle"], "horizontal": ["horizontally", "left to right"],
             "vertical": ["vertically", "top to bottom"], "blurred": ["a blurred backdrop", "a blurry backdrop"]}
WORDS_FOR.update({r: [f"the {r} half", f"the {r} part"] for r in ("left", "right", "top", "bottom")})


def _table(text):
    """'name | a | b' lines (an indented line continues the one above) -> {name: [a, b]}."""
    rows = [[c.strip() for c in line.split("|")] for line in re.sub(r"\n\s+", " ", text.strip()).splitlines()]
    return {row[0]: row[1:] for row in rows}


# {s} is the subject, {g} a goal that is not an amount. Templates 2 and 5 of each action (index % 3 == 2) are the
# test split; each action lists direct phrasings first and indirect ones ("{s} is far too dark") last.
TEMPLATES = _table("""
brighten | increase the brightness of {s} {amt} | make {s} {cmp} brighter | brighten {s} {amt} | lighten {s} {amt}
    | {s} is {too} dark | {s} looks {too} gloomy, light it up
darken | darken {s} {amt} | make {s} {cmp} darker | reduce the brightness of {s} {amt}
    | lower the exposure of {s} {amt} | {s} is {too} bright | {s} looks {too} overexposed
increase contrast | increase the contrast of {s} {amt} | make {s} {cmp} punchier | boost the contrast in {s} {amt}
    | add contrast to {s} {amt} | {s} looks {too} flat | the shadows and highlights in {s} are {too} muddy
decrease contrast | decrease the contrast of {s} {amt} | give {s} {cmp} less contrast
    | reduce the contrast in {s} {amt} | lower the contrast of {s} {amt} | {s} looks {too} harsh
    | the lights and darks in {s} are {too} extreme
saturate | increase the saturation of {s} {amt} | make the colors of {s} {cmp} more vivid | saturate {s} {amt}
    | boost the colors in {s} {amt} | {s} looks {too} washed out | the colors in {s} are {too} dull
desaturate | desaturate {s} {amt} | make the colors of {s} {cmp} more muted | reduce the saturation of {s} {amt}
    | tone down the colors in {s} {amt} | {s} is {too} colorful | the colors in {s} are {too} loud
grayscale | convert {s} to grayscale | make {s} black and white | render {s} in grayscale | remove all color from {s}
    | I want {s} in black and white, no color at all | drain every bit of color out of {s}
sepia | apply a sepia tone to {s} | make {s} sepia | give {s} a sepia filter | turn {s} sepia
    | give {s} a brownish antique tint | {s} should look like a faded brown print from 1900
warm | warm up {s} {amt} | make {s} {cmp} warmer | add warmth to {s} {amt}
    | shift the colors of {s} toward orange {amt} | {s} feels {too} cold | the light in {s} is {too} icy
cool | cool down {s} {amt} | make {s} {cmp} cooler | make the colors of {s} {cmp} bluer | add a blue tint to {s} {amt}
    | {s} feels {too} warm | make {s} feel {cmp} more like a cold winter morning
recolor | recolor {s} {g} | turn {s} {g} | change the color of {s} to {g} | paint {s} {g}
    | I'd like {s} to be {g} instead | what if {s} were {g}?
blur | blur {s} {amt} | make {s} {cmp} blurrier | defocus {s} {amt} | make {s} {cmp} less sharp
    | {s} is {too} crisp and distracting | {s} is {too} sharp
sharpen | sharpen {s} {amt} | make {s} {cmp} sharper | increase the sharpness of {s} {amt} | make {s} {cmp} crisper
    | {s} is {too} blurry | {s} looks {too} soft and out of focus
denoise | denoise {s} {amt} | remove noise from {s} {amt} | reduce the noise in {s} {amt} | make {s} {cmp} cleaner
    | {s} is {too} noisy | {s} looks {too} speckled
remove | remove {s} | delete {s} | erase {s} | get rid of {s} | I don't want {s} in the picture
    | {s} should not be there
crop | crop {s} to a {g} aspect ratio | crop {s} to {g} | cut {s} down to a {g} frame | trim {s} to {g}
    | {s} needs to be {g} for my post | reframe {s} as {g}
rotate | rotate {s} by {g} | turn {s} {g} | rotate {s} through {g} | spin {s} around {g}
    | {s} is oriented wrong, rotate it {g} | {s} needs to be turned {g}
flip | flip {s} {g} | mirror {s} {g} | flip {s} over {g} | reflect {s} {g} | {s} is facing the wrong way, flip it {g}
    | show {s} mirrored {g}
vignette | add a {adj} vignette to {s} | vignette {s} {amt} | darken the corners of {s} {amt}
    | give {s} a {adj} vignette | make the corners of {s} {cmp} darker
    | draw the eye to the middle of {s} by shading its edges {amt}
add grain | add {adj} grain to {s} | add film grain to {s} {amt} | give {s} a {adj} grainy texture
    | make {s} {cmp} grainier | {s} looks {too} clean and digital | {s} is {too} smooth, it needs some texture
pixelate | pixelate {s} {amt} | apply a {adj} pixelation to {s} | make {s} {cmp} blockier
    | add a {adj} mosaic over {s} | hide {s} behind {adj} pixels | censor {s} with {adj} pixel blocks
replace background | replace {s} with {g} | change {s} to {g} | swap {s} for {g} | set the subject against {g}
    | {s} is distracting, I want {g} instead | get rid of the busy background and use {g}
""")

# Composites: one indirect phrase that means several whole-image edits, listed in the order they should be applied.
COMPOSITES = {
    "old photo": (["make it look like an old photograph", "make this look like a photo from 1920"],
                  [("sepia", "full"), ("vignette", "moderately"), ("add grain", "moderately")]),
    "security camera": (["make it look like a security camera still", "make this look like cctv footage"],
                        [("grayscale", "full"), ("decrease contrast", "slightly"), ("add grain", "strongly")]),
    "8-bit": (["make it look like an 8-bit video game", "give it a retro arcade game look"],
              [("pixelate", "strongly"), ("saturate", "strongly")]),
    "faded": (["make it look like a sun-bleached poster", "give it a faded, washed-out look"],
              [("desaturate", "moderately"), ("decrease contrast", "moderately"), ("brighten", "slightly")]),
    "dreamy": (["give it a dreamy look", "make it soft and dreamy, like a memory"],
               [("blur", "slightly"), ("brighten", "slightly"), ("warm", "slightly")]),
    "noir": (["make it look like a film noir still", "give it the look of a 1940s detective movie"],
             [("grayscale", "full"), ("increase contrast", "strongly"), ("vignette", "strongly")]),
    "night": (["make it look like it was taken at night", "turn the scene into a moonlit night"],
              [("darken", "strongly"), ("cool", "strongly")]),
}
JOINERS = [", ", " and ", "; then ", "; also ", ", then ", ". Also, "]
OPPOSITES = [{"brighten", "darken"}, {"increase contrast", "decrease contrast"}, {"saturate", "desaturate"},
             {"warm", "cool"}, {"blur", "sharpen"}, {"grayscale", "sepia"}]  # never asked for together


def combo_split(actions):
    """The split that owns a combination of 2-3 actions: a stable hash of the sorted actions, ~1/3 to test."""
    return "test" if zlib.crc32("+".join(sorted(actions)).encode()) % 3 == 0 else "train"


TEMPLATE_SPLIT = {f"{a}/{i}": "test" if i % 3 == 2 else "train" for a, ts in TEMPLATES.items() for i in range(len(ts))}
TEMPLATE_SPLIT.update({f"{c}/{i}": combo_split([a for a, _ in edits]) for c, (says, edits) in COMPOSITES.items()
                       for i in range(len(says))})


def _color_of(subject):
    """'red circle' -> 'red'; None for subjects that are not drawn coloured objects."""
    words = subject.split()
    return words[0] if len(words) == 2 and words[0] in COLORS and words[1] in SHAPES else None


# Which subjects an action takes; any subject for the actions not listed (tone, colour, blur, ...).
TAKES = {"replace background": lambda s: s == "background", "pixelate": lambda s: s in ("whole image", "face", "text"),
         "remove": lambda s: s == "text" or _color_of(s), "recolor": lambda s: s not in REGIONS and s != "face"}
TAKES.update({a: lambda s: s == "whole image" for a in ("crop", "rotate", "flip", "vignette", "add grain")})


def subjects_for(action, image):
    """The subjects of a built-in image that an action makes sense on (maybe none)."""
    return [s for s in image_subjects(image) if TAKES.get(action, bool)(s)]


def render(rng, template, action, subject, goal):
    """Fill one template with varied words for one (action, subject, goal)."""
    g = WORDS_FOR.get(goal, [goal])
    if action == "replace background" and goal != "blurred":
        g = [f"a plain {goal} backdrop", f"a solid {goal} backdrop", f"a {goal} backdrop"]
    amounts = {k: rng.choice(say[AMOUNTS.index(goal)]) for k, say in SAY.items()} if goal in AMOUNTS else {}
    return template.format(s=rng.choice(WORDS_FOR.get(subject, [f"the {subject}"])), g=rng.choice(g), **amounts)


def _edit(rng, action, image):
    subject = rng.choice(subjects_for(action, image))
    return action, subject, rng.choice([g for g in GOALS[action] if g != _color_of(subject)])  # no red -> red


def _multi(rng, split, image):
    """2-3 edits with distinct, non-opposite actions whose combination belongs to `split`."""
    possible = [a for a in ACTIONS if subjects_for(a, image)]
    while True:  # about a third of the combinations are test, so this takes a few tries
        actions = rng.sample(possible, rng.choice([2, 2, 3]))
        if combo_split(actions) != split or any(o <= set(actions) for o in OPPOSITES):
            continue
        edits = [_edit(rng, a, image) for a in actions]
        gone = {s for a, s, _ in edits if a in ("remove", "replace background")}
        if not any(s in gone for a, s, _ in edits if a not in ("remove", "replace background")):
            return edits  # no edit works on what another one removes or replaces


def make_split(split, n=None, seed=0):
    """n labelled requests on built-in images (default: train 2000, test 200). Deterministic for (split, n, seed),
    and a smaller n gives a prefix of a larger one."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    n = {"train": 2000, "test": 200}[split] if n is None else n
    if not isinstance(n, int) or n < 0:
        raise DataError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(f"{split}:{seed}")  # a str seed goes through sha512: the same on every run and machine
    mine = {a: [i for i in range(len(ts)) if TEMPLATE_SPLIT[f"{a}/{i}"] == split] for a, ts in TEMPLATES.items()}
    composites = [c for c in COMPOSITES if TEMPLATE_SPLIT[f"{c}/0"] == split]
    names, deck, samples = image_names(), [], []
    while len(samples) < n:
        kind = rng.random()
        if kind < 0.1:  # a composite (few phrasings, so rare, or they would repeat a lot)
            c = rng.choice(composites)
            j = rng.randrange(len(COMPOSITES[c][0]))
            text, ids, image = COMPOSITES[c][0][j], [f"{c}/{j}"], rng.choice(names)
            edits = [(a, "whole image", g) for a, g in COMPOSITES[c][1]]
        else:
            if kind < 0.6:  # one edit; actions are dealt from a shuffled deck, so even a short split has them all
                deck = deck or rng.sample(ACTIONS, len(ACTIONS))
                action = deck.pop()
                image = rng.choice([m for m in names if subjects_for(action, m)])
                edits = [_edit(rng, action, image)]
            else:
                image = rng.choice(names)
                edits = _multi(rng, split, image)
            picks = [rng.choice(mine[a]) for a, _, _ in edits]  # one template of this split per edit
            ids = [f"{a}/{i}" for i, (a, _, _) in zip(picks, edits)]
            parts = [render(rng, TEMPLATES[a][i], a, s, g) for i, (a, s, g) in zip(picks, edits)]
            text = parts[0] + "".join(rng.choice(JOINERS) + p for p in parts[1:])
        samples.append({"image": image, "instruction": text[0].upper() + text[1:], "action": [e[0] for e in edits],
                        "subject": [e[1] for e in edits], "goal": [e[2] for e in edits], "template": "+".join(ids)})
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Dataset folders

def _check_labels(row, where):
    """Labels are optional, but when present they are three aligned lists of non-empty strings without ';'."""
    present = [k for k in LABELS if k in row]
    if present and len(present) < 3:
        missing = [k for k in LABELS if k not in row]
        raise DataError(f"{where}: labels come together: has {', '.join(present)} but not {', '.join(missing)}")
    for k in present:
        if not isinstance(row[k], list) or not row[k] or not all(isinstance(x, str) and x.strip() for x in row[k]):
            raise DataError(f"{where}: {k} must be a non-empty list of non-empty strings, got {row[k]!r}")
        if any(";" in x for x in row[k]):  # ';' separates items in the planner's tags, so it cannot be inside one
            raise DataError(f"{where}: an item of {k} contains ';': {row[k]!r}")
    if present and len({len(row[k]) for k in LABELS}) > 1:
        raise DataError(f"{where}: labels of unequal length: " + ", ".join(f"{k} {len(row[k])}" for k in LABELS))


def write_folder(samples, out_dir):
    """Write samples as a dataset folder, img/0000.png ... and metadata.jsonl, and return its path. Images come from
    a sample's "image_path" if it has one, else builtin_image(sample["image"]); a "target_path" is copied to tgt/."""
    out = pathlib.Path(out_dir)
    meta = out / "metadata.jsonl"
    if meta.exists():
        raise DataError(f"{meta} already exists; refusing to overwrite a dataset, choose another folder")
    if not samples:
        raise DataError("no samples to write")
    for i, s in enumerate(samples):  # check them all before writing anything
        if not isinstance(s.get("instruction"), str) or not s["instruction"].strip():
            raise DataError(f"sample {i}: missing instruction")
        _check_labels(s, f"sample {i}")
        if "image_path" not in s and "image" not in s:
            raise DataError(f"sample {i}: has neither an 'image_path' nor a built-in 'image' name")
    width = max(4, len(str(len(samples) - 1)))
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples):
        row = {"file_name": f"img/{i:0{width}d}.png", "instruction": s["instruction"]}
        (load_image(s["image_path"]) if "image_path" in s else builtin_image(s["image"])).save(out / row["file_name"])
        row.update({k: list(s[k]) for k in LABELS if k in s})
        if "target_path" in s:
            (out / "tgt").mkdir(exist_ok=True)
            row["target_file_name"] = f"tgt/{i:0{width}d}.png"
            load_image(s["target_path"]).save(out / row["target_file_name"])
        rows.append(row)
    tmp = out / "metadata.jsonl.tmp"  # write, then rename: a crash never leaves half a metadata.jsonl behind
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, meta)
    return out


def _canonical_actions(actions, where):
    """Labelled actions by their canonical names: a synonym the reward accepts ("lighten") becomes its action
    ("brighten"); anything else is refused, since no plan could match it and the cold start would teach it."""
    out = [normalize(a, "action") for a in actions]
    unknown = [a for a, c in zip(actions, out) if c not in ACTIONS]
    if unknown:
        raise DataError(f"{where}: unknown action {', '.join(map(repr, unknown))}; the actions are "
                        f"{', '.join(ACTIONS)} (or a synonym of one in plan.SYNONYMS)")
    return out


def read_folder(path):
    """Read a dataset folder into samples {"file_name", "image_path", "instruction"}, plus "action", "subject",
    "goal" and "target_path" when present. Paths are absolute strings; blank lines are skipped; actions are given
    by their canonical names (ACTIONS)."""
    root = pathlib.Path(path)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"dataset folder {root} has no metadata.jsonl")
    try:
        text = meta.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{meta} is not UTF-8 text (byte {e.start}); it should hold one JSON object a line") from e
    samples = []
    for n, line in enumerate(text.splitlines(), start=1):
        where = f"{meta}:{n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e}") from e
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("file_name", "instruction"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{where}: missing {key}")
        _check_labels(row, where)
        sample = {"file_name": row["file_name"], "instruction": row["instruction"]}
        for key, what, out_key in (("file_name", "image", "image_path"), ("target_file_name", "target", "target_path")):
            if key in row:
                if not (root / row[key]).is_file():
                    raise DataError(f"{where}: {what} {row[key]} not found")
                sample[out_key] = str((root / row[key]).resolve())
        if "action" in row:
            row["action"] = _canonical_actions(row["action"], where)
        samples.append(sample | {k: row[k] for k in LABELS if k in row})
    if not samples:
        raise DataError(f"{meta} has no samples")
    return samples


if __name__ == "__main__":
    for split in ("train", "test"):
        if len(sys.argv) > 1:
            print(f"wrote {write_folder(make_split(split), pathlib.Path(sys.argv[1]) / split)}")
        else:
            for s in make_split(split, 5):
                print(f"{split:5} {s['image']:18} {s['instruction']}\n      {s['action']} {s['subject']} {s['goal']}")


def grpo_batch(train, seed, step, B):
    """The B train requests GRPO step `step` samples: fixed by (seed, step), so a resumed run replays them."""
    return random.Random(f"{seed}:{step}").sample(train, B)


def load_requests(folder, split, n, seed, at_least=1):
    """Labelled requests: the first n of a dataset folder (its whole metadata.jsonl read and checked, labels
    included), or n built-in ones of a split. Fewer than `at_least` is an error."""
    rows = read_folder(folder)[:n] if folder else make_split(split, n, seed=seed)
    for r in rows:
        if "action" not in r:
            raise DataError(f"{folder}/metadata.jsonl: {r['file_name']} has no action/subject/goal labels; "
                            "the paper's reward needs them")
    if len(rows) < at_least:
        raise DataError(f"{len(rows)} {split} requests (n={n}" + (f", folder {folder}" if folder else "") +
                        f"), and at least {at_least} are needed" + (" (batch_prompts)" if at_least > 1 else ""))
    return rows
