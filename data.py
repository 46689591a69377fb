"""
Data: built-in images, dataset folders and a GRPO step's batch. The requests themselves, with their gold labels and
the train/test splits, are made in phrasings.py.

Images: photos that scikit-image ships inside its wheel (no download) and 8 drawn scenes (`scene0`..`scene7`: a
backdrop, 1-3 shapes in named colours, sometimes a word), each with the subjects that make sense on it.

Folders follow the Hugging Face image-folder convention: `img/0000.png` ... and `metadata.jsonl`, one {"file_name",
"instruction", "action", "subject", "goal", "target_file_name"} object per line (labels, target optional).
"""
import functools
import json
import os
import pathlib
import random

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


def grpo_batch(train, seed, step, B, round=0):
    """The B train requests GRPO step `step` samples: fixed by (seed, step), so a resumed run replays them. Round
    r > 0: the fresh requests of dynamic sampling's r-th round (train.py), fixed by (seed, step, r)."""
    return random.Random(f"{seed}:{step}" + (f":{round}" if round else "")).sample(train, B)
