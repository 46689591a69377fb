"""
Region agents: turn a subject ("the red car", "background", "her face", "text") into a mask on the image.

    r = regions.find(image, "the red car")  # Region(mask=float32 HxW in [0, 1], agent="color", note="...")
    regions.agent_for("her coat")           # "person": where a subject goes, without loading or running anything
    regions.describe(image)                 # "512x512 image; a person; 1 face; colors: orange, red, gray; ..."

Routing, after lower case, articles, possessives and plan.SYNONYMS; the first rule that matches wins:
    whole       "whole image", "photo", "everything", ""          a mask of ones
    frame       "left", "top half", "upper left", "center"        halves, their crossings, the middle half
    text        "text", "sign", "caption", "letters"              boxes of the text RapidOCR reads, dilated
    background  "background", "sky", "backdrop"                   1 - the foreground (below)
    color       a colour word first: "red circle", "blue cars"    HSV colour names, connected components
    face        "face", "head", "eyes"                            MediaPipe face detection, else the Haar cascade
    person      "person", "woman", "coat", "hair"                 MediaPipe selfie segmentation
    salient     a known object noun: "cat", "cup", "subject"      drawings: the largest flat coloured shape;
                                                                   photos: saliency box -> grabCut
    whole       any other word ("unicorn"): no agent can look for it, so the whole image, and the note says so
An agent that finds nothing falls back (text, face, person -> whole image; color -> salient) and says so in the
note. The foreground behind "background" is the person when one is seen (selfie mask > 2% with a face on it),
else the flat coloured shapes of a drawing, else the salient subject.

Simplified: no open-vocabulary grounding on CPU. The salient agent finds *the* main subject whatever noun is asked
("cat" and "cup" get the same mask); clothes and hair get the whole person; the text agent sees only text that
RapidOCR can read (not handwriting). Models see a copy of at most 512 px (grabCut 192 px: it takes 5 s at 512);
masks come back at the image's own size. Models come only from registry.agent(name), so a subject loads only the
agents it needs and tests can swap in fakes.
"""
from dataclasses import dataclass

import cv2
import numpy as np

import registry
from data import sample_image
from plan import SYNONYMS, normalize

WORK_SIZE = 512  # perception and region agents see at most this many pixels a side (edit.py, train.py)

WORK, CUT = 512, 192  # longest side the models see; the longest side grabCut sees


@dataclass
class Region:
    mask: np.ndarray   # float32 (H, W) in [0, 1], the image's own size
    agent: str         # "whole", "frame", "person", "background", "face", "text", "salient", "color"
    note: str          # one line for the trace


# ----------------------------------------------------------------------------------------------------------------
# Routing

DETERMINERS = {"the", "a", "an", "her", "his", "my", "their", "its", "our", "your", "this", "that", "these", "those"}
WHOLE = {"whole image", "image", "photo", "picture", "everything", "all", "", "scene", "frame", "whole thing"}
FRAME = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "upper": "top", "lower": "bottom",
         "center": "center", "centre": "center", "middle": "center", "central": "center"}
FILLER = {"side", "half", "part", "portion", "area", "region", "corner", "edge", "of", "image", "photo", "picture"}
TEXT = {"text", "writing", "word", "sign", "caption", "letter", "lettering", "title", "label", "logo", "watermark",
        "headline", "inscription"}
BACKGROUND = {"background", "backdrop", "sky", "surroundings", "scenery", "behind", "wall", "setting"}
NAMES = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "gray", "black"]
COLORS = {n: n for n in NAMES} | {"violet": "purple", "grey": "gray"}
FACE = {"face", "head", "eye", "mouth", "nose", "lips", "cheek", "forehead"}
CLOTHES = {"coat", "shirt", "dress", "jacket", "suit", "clothes", "clothing", "outfit", "hair", "skin", "hat",
           "sweater", "trouser", "pant", "jean", "skirt", "uniform", "spacesuit", "arm", "hand"}
PERSON = {"person", "people", "man", "men", "woman", "women", "body", "boy", "girl", "child", "kid", "lady", "guy",
          "human", "figure", "someone", "astronaut", "photographer", "he", "she", "him", "portrait"} | CLOTHES
# Nouns the salient agent may stand for: it cannot tell them apart, but it can find a main subject.
OBJECTS = set("""subject object thing item shape foreground main cat dog bird horse animal cup mug coffee rocket
    motorcycle motorbike bike bicycle car vehicle truck bus boat plane airplane train camera tripod helmet flower
    plant tree fruit apple banana bottle glass vase book phone laptop chair table bowl plate saucer spoon ball toy
    circle square triangle star galaxy building house tower statue kitten puppy""".split())


def _words(subject):
    """'The man's red Coat!' -> ['man', 's', 'red', 'coat'], synonyms applied, leading determiners dropped."""
    words = normalize(str(subject), "subject").split()
    while len(words) > 1 and words[0] in DETERMINERS:
        words = words[1:]
    s = " ".join(words)
    return SYNONYMS["subject"].get(s, s).split()


def _singular(w):
    return w[:-1] if w.endswith("s") and not w.endswith("ss") and len(w) > 3 else w


def _route(subject):
    """(agent, words) of a subject."""
    words = _words(subject)
    has = lambda vocab: any(w in vocab or _singular(w) in vocab for w in words)  # noqa: E731
    if " ".join(words) in WHOLE:
        return "whole", words
    if all(w in FRAME or w in FILLER for w in words) and has(FRAME):
        return "frame", words
    for agent, vocab in (("text", TEXT), ("background", BACKGROUND)):
        if has(vocab):
            return agent, words
    if words[0] in COLORS:
        return "color", words
    for agent, vocab in (("face", FACE), ("person", PERSON), ("salient", OBJECTS)):
        if has(vocab):
            return agent, words
    return "whole", words  # a noun no agent knows


def agent_for(subject):
    """Which agent a subject goes to, without loading or running anything."""
    return _route(subject)[0]


# ----------------------------------------------------------------------------------------------------------------
# Helpers and colour names

def _check(image):
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}: np.asarray(pil.convert('RGB'))")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be uint8 RGB of shape (H, W, 3), got {image.dtype} {image.shape}")


def downscale(image, side=WORK):
    """A contiguous copy (MediaPipe needs one) whose longest side is at most `side`."""
    h, w = image.shape[:2]
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.ascontiguousarray(image) if f >= 1 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def upscale(mask, shape):
    """A mask as float32 in [0, 1] at the size (H, W) of `shape`."""
    return np.clip(cv2.resize(mask.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)


def _fill(binary):
    """The blobs of a binary mask with their holes filled (outer contours drawn solid), uint8."""
    contours, _ = cv2.findContours(binary.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.zeros(binary.shape, np.uint8), contours, -1, 1, thickness=cv2.FILLED)


def _components(binary, min_area):
    """[(area, bool mask)] of the 8-connected blobs of at least min_area pixels, largest first."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    keep = sorted((i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area),
                  key=lambda i: (-stats[i, cv2.CC_STAT_AREA], i))
    return [(int(stats[i, cv2.CC_STAT_AREA]), labels == i) for i in keep]


def _pct(mask):
    return f"{100 * float(mask.mean()):.0f}%"


HUES = [(6, "orange"), (20, "yellow"), (35, "green"), (85, "blue"), (128, "purple"), (150, "pink"), (172, "red")]


def color_names(rgb):
    """Index into NAMES of every pixel, (H, W) uint8. Saturated pixels (S >= 90/255 and max-min >= 60) are named by
    hue (pale reds are pink, dark oranges brown); the rest are black, gray or white by brightness."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # OpenCV's H is in [0, 180)
    h, s, v = (hsv[..., i].astype(np.int32) for i in range(3))
    out = np.zeros(h.shape, np.uint8)  # red below hue 6
    for start, name in HUES:
        out[h >= start] = NAMES.index(name)
    out[((h < 6) | (h >= 172)) & (s < 153) & (v > 178)] = NAMES.index("pink")
    out[(h >= 6) & (h < 20) & (v < 153)] = NAMES.index("brown")
    grey = (s < 90) | (rgb.max(axis=2).astype(np.int32) - rgb.min(axis=2) < 60)
    out[grey] = NAMES.index("gray")
    out[grey & (v < 64)] = NAMES.index("black")
    out[grey & (v > 204)] = NAMES.index("white")
    return out


def _blobs(names, k, min_area):
    """[(area, uint8 mask)] of the blobs named NAMES[k], largest first, holes filled, and with the small black blobs
    that touch them (a car's wheels) added."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats((names == NAMES.index("black")).astype(np.uint8))
    out = []
    for area, comp in _components(names == k, min_area):
        comp = _fill(comp)
        ids = np.unique(labels[cv2.dilate(comp, np.ones((5, 5), np.uint8)) > 0])
        comp[np.isin(labels, ids[(ids > 0) & (stats[ids, cv2.CC_STAT_AREA] < 0.25 * comp.sum())])] = 1
        out.append((area, _fill(comp)))
    return out


def _drawn(rgb, names):
    """The flat coloured shapes of a drawing, largest first: saturated blobs whose inside is one colour to within 2
    levels (blobs of a photo never are)."""
    out, inside = [], np.ones((5, 5), np.uint8)
    for k in range(NAMES.index("brown")):  # the saturated names
        for area, comp in _blobs(names, k, 0.002 * names.size):
            px = rgb[cv2.erode(((names == k) & (comp > 0)).astype(np.uint8), inside) > 0].astype(np.int16)
            if len(px) > 0.004 * names.size and (np.abs(px - np.median(px, axis=0)).max(axis=1) <= 2).mean() > 0.85:
                out.append((area, comp))
    return sorted(out, key=lambda b: -b[0])


# ----------------------------------------------------------------------------------------------------------------
# The agents, on the working copy

def _frame(shape, words):
    """The crossing of the named parts: halves, and the middle half in each dimension for "center"."""
    h, w = shape[:2]
    hw, hh, mask = (w + 1) // 2, (h + 1) // 2, np.ones((h, w), np.float32)
    off = {"left": [np.s_[:, hw:]], "right": [np.s_[:, :w - hw]], "top": [np.s_[hh:]], "bottom": [np.s_[:h - hh]],
           "center": [np.s_[:h // 4], np.s_[h - h // 4:], np.s_[:, :w // 4], np.s_[:, w - w // 4:]]}
    for part in {FRAME[x] for x in words if x in FRAME}:
        for where in off[part]:
            mask[where] = 0
    return mask


def _person(rgb):
    return np.clip(registry.agent("selfie").process(rgb).segmentation_mask.astype(np.float32), 0, 1)


def _faces(rgb):
    """Face boxes (x, y, w, h) in pixels, and the detector: MediaPipe, else (only then loaded) the Haar cascade."""
    h, w = rgb.shape[:2]
    found = registry.agent("face").process(rgb).detections or []
    boxes = [(b.xmin * w, b.ymin * h, b.width * w, b.height * h)
             for b in (d.location_data.relative_bounding_box for d in found)]
    if boxes:
        return sorted(boxes), "MediaPipe"
    side = max(16, min(h, w) // 20)
    found = registry.agent("haar").detectMultiScale(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), scaleFactor=1.1,
                                                  minNeighbors=5, minSize=(side, side))
    return sorted(tuple(map(float, b)) for b in found), "Haar cascade"


def _text(rgb):
    """(mask, words) of the text RapidOCR reads: its boxes filled and dilated so that whole glyphs are covered.
    A reading needs 2 Latin letters or digits ("+" or "■" read off a drawn shape is not text)."""
    h, w = rgb.shape[:2]  # RapidOCR scales the short side up to 736 px: pad thin images (right, bottom) to 2:1
    side = max(h, w) // 2
    padded = cv2.copyMakeBorder(rgb, 0, max(0, side - h), 0, max(0, side - w), cv2.BORDER_REPLICATE)
    result, _ = registry.agent("ocr")(padded)
    mask, words = np.zeros(padded.shape[:2], np.uint8), []
    for box, text, _score in result or []:
        if sum(c.isascii() and c.isalnum() for c in text) >= 2:
            cv2.fillPoly(mask, [np.round(np.asarray(box, np.float32)).astype(np.int32)], 1)
            words.append(text)
    d = 2 * max(3, min(rgb.shape[:2]) // 100) + 1
    return cv2.dilate(mask, np.ones((d, d), np.uint8))[:h, :w].astype(np.float32), words


def _salient(rgb, names=None, plural=False):
    """(mask or None, how) of the main subject. A drawing: its largest flat shape (all shapes for a plural).
    A photo: the box holding the middle 90% of the squared fine-grained saliency -> grabCut (4 iterations, on a
    <= 192 px copy) -> largest blob. When grabCut keeps under a fifth of a box that fills most of the frame, the
    photo is a close-up and the box is the subject."""
    names = color_names(rgb) if names is None else names
    shapes = _drawn(rgb, names)
    if shapes:
        keep = [m for a, m in shapes if a >= 0.1 * shapes[0][0]] if plural else [shapes[0][1]]
        return upscale(np.any(keep, axis=0), rgb.shape), "drawn shapes" if plural else "largest drawn shape"
    small = downscale(rgb, CUT)
    h, w = small.shape[:2]
    ok, sal = registry.agent("saliency").computeSaliency(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if not ok or h < 8 or w < 8:
        return None, "no saliency"
    k = 2 * (min(h, w) // 16) + 1
    weight = cv2.GaussianBlur(np.nan_to_num(np.asarray(sal, np.float32)), (k, k), 0) ** 2
    if weight.sum() <= 0:
        return None, "no saliency"
    (x0, x1), (y0, y1) = [np.searchsorted(np.cumsum(p) / p.sum(), [0.05, 0.95]) for p in
                          (weight.sum(axis=0), weight.sum(axis=1))]
    x0, y0, x1, y1 = max(x0 - 2, 1), max(y0 - 2, 1), min(x1 + 2, w - 2), min(y1 + 2, h - 2)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None, "no salient box"
    gc = np.zeros((h, w), np.uint8)
    cv2.setRNGSeed(0)  # grabCut's k-means draws from OpenCV's global RNG: seed it, or masks change between calls
    cv2.grabCut(small, gc, (int(x0), int(y0), int(x1 - x0), int(y1 - y0)), np.zeros((1, 65)), np.zeros((1, 65)),
                4, cv2.GC_INIT_WITH_RECT)
    fg = _components((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD), 0.01 * h * w)
    box = (x1 - x0) * (y1 - y0)
    if (not fg or fg[0][0] < 0.2 * box) and box > 0.6 * h * w:
        mask, how = np.zeros((h, w), np.float32), "close-up: the subject fills the frame"
        mask[y0:y1, x0:x1] = 1
    elif fg:
        mask, how = _fill(fg[0][1]).astype(np.float32), "saliency+grabCut"
    else:
        return None, "grabCut kept nothing"
    return upscale(cv2.GaussianBlur(mask, (3, 3), 0), rgb.shape), how


def _person_seen(rgb, person, boxes=None):
    """A person is there when the selfie mask covers > 2% and a face lies on it: the selfie model alone takes
    cats and cups for people too. The face agents are asked (and loaded) only when the mask is big enough."""
    if (person > 0.5).mean() <= 0.02:
        return False
    h, w = person.shape
    boxes = _faces(rgb)[0] if boxes is None else boxes
    return any(person[min(int(y + bh / 2), h - 1), min(int(x + bw / 2), w - 1)] > 0.5 for x, y, bw, bh in boxes)


# ----------------------------------------------------------------------------------------------------------------
# The two entry points

def find(image, subject):
    """The Region of `subject` on `image` (uint8 RGB, H x W x 3), at the image's own size. Never raises for an odd
    subject: what no agent finds is the whole image, and the note says so."""
    _check(image)
    agent, words = _route(subject)
    name, shape, rgb = " ".join(words) or "whole image", image.shape, downscale(image)

    def whole(why):
        return Region(np.ones(shape[:2], np.float32), "whole", why)

    def region(mask, note):  # the mask at the image's size, and its share in the note
        mask = upscale(mask, shape)
        return Region(mask, agent, f"{note}: {_pct(mask)} of the image")

    if agent == "whole":
        return whole("whole image" if name in WHOLE else f"'{name}': no agent can look for it, whole image")
    if agent == "frame":
        return region(_frame(shape, words), name)
    if agent == "text":
        mask, found = _text(rgb)
        return region(mask, f"text {' '.join(found[:3])!r}") if found else whole(f"no text found for '{name}': "
                                                                                  "whole image")
    if agent == "face":
        boxes, by = _faces(rgb)
        if not boxes:
            return whole(f"no face found for '{name}': whole image")
        mask = np.zeros(rgb.shape[:2], np.float32)
        for x, y, w, h in boxes:  # ellipses over the boxes, enlarged to take in the forehead and chin; soft edges
            centre, axes = (round(x + w / 2), round(y + 0.4 * h)), (round(0.6 * w), round(0.75 * h))
            cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, thickness=-1)
        k = 2 * max(1, min(rgb.shape[:2]) // 100) + 1
        return region(cv2.GaussianBlur(mask, (k, k), 0), f"{len(boxes)} face{'s' * (len(boxes) > 1)} by {by}")
    if agent == "person":
        person = _person(rgb)
        if (person > 0.5).mean() < 0.01:
            return whole(f"no person found for '{name}': whole image")
        part = {_singular(w) for w in words} & CLOTHES
        return region(person, f"{name} (the whole person: clothes and hair are not separated)" if part else name)
    names = color_names(rgb)
    if agent == "background":
        person = _person(rgb)
        if _person_seen(rgb, person):
            fg, what = person, "the person"
        else:
            fg, how = _salient(rgb, names, plural=True)
            what = f"the main subject ({how})"
        if fg is None:
            return whole(f"no foreground found ({what}): whole image as background")
        return region(1 - upscale(fg, rgb.shape), f"background around {what}")
    plural = words[-1] != _singular(words[-1])  # "red circles", "cars": every blob, not the largest
    if agent == "color":
        color = COLORS[words[0]]
        blobs = _blobs(names, NAMES.index(color), max(4, 0.001 * names.size))
        if blobs:  # a bare colour ("make the red redder") means all of it, like a plural
            keep = [m for a, m in blobs if a >= 0.1 * blobs[0][0]] if plural or len(words) == 1 else [blobs[0][1]]
            return region(np.any(keep, axis=0), f"{name}: {len(keep)} {color} blob{'s' * (len(keep) > 1)}")
        agent, why = "salient", f"no {color} found: "
    else:
        why = ""
    mask, how = _salient(rgb, names, plural)
    if mask is None:
        return whole(f"{why}'{name}': {how}, whole image")
    return region(mask, f"{why}main subject ({how}) for '{name}'")


def describe(image):
    """A short perception text for a text-only planner: size, people, faces, readable text, colours (saturated ones
    first: they name the objects), where the main subject is. Deterministic."""
    _check(image)
    rgb, (h, w) = downscale(image), image.shape[:2]
    person, (boxes, _) = _person(rgb), _faces(rgb)
    seen = _person_seen(rgb, person, boxes)
    parts = [f"{w}x{h} image", "a person" if seen else "no person", f"{len(boxes)} face{'s' * (len(boxes) != 1)}"]
    words = " ".join(_text(rgb)[1]).split()
    if words:
        parts.append("text: " + " ".join(words[:3]))
    names = color_names(rgb)
    share = np.bincount(names.ravel(), minlength=len(NAMES)) / names.size
    order, grey = np.argsort(-share, kind="stable"), NAMES.index("white")
    colors = ([NAMES[k] for k in order if k < grey and share[k] >= 0.01][:3]
              + [NAMES[k] for k in order if k >= grey and share[k] >= 0.1][:2])
    parts.append("colors: " + ", ".join(colors))
    mask = person if seen else _salient(rgb, names)[0]
    if mask is not None and mask.sum() > 0:
        ys, xs = np.indices(mask.shape)
        cy, cx = (ys * mask).sum() / mask.sum() / mask.shape[0], (xs * mask).sum() / mask.sum() / mask.shape[1]
        where = [["top", "", "bottom"][min(int(cy * 3), 2)], ["left", "", "right"][min(int(cx * 3), 2)]]
        parts.append(f"main subject: {' '.join(x for x in where if x) or 'center'}, {_pct(mask)}")
    return "; ".join(parts)


def describe_requests(samples):
    """Add the perception text of each sample's image ("description"), the line edit.py gives the planner.
    Each distinct image is described once (built-in ones at 512 px, the size edit.py's agents work at)."""
    seen = {}
    for s in samples:
        key = s.get("image_path") or s["image"]
        if key not in seen:
            seen[key] = describe(downscale(np.asarray(sample_image(s, WORK_SIZE)), WORK_SIZE))
        s["description"] = seen[key]
    return samples
