"""
The plan: what the decomposition agent writes and everything that reads it, with no model and no image.

    <action>recolor; blur</action><subject>coat; background</subject><goal>scarlet; strong</goal>

Items are separated by ';' and aligned by position; an optional <think>...</think> may come first. `parse` reads a
completion (never raises), `normalize` maps an item onto the canonical words of the built-in data (lower case,
articles and punctuation stripped, the synonym table), `format_plan` writes gold labels as a completion, `f1` is the
paper's per-field score. A Step is one atomic sub-request; `rule_order` orders Steps by stage when no sequencing
model is used.
"""
import re
from collections import Counter
from itertools import permutations
from dataclasses import dataclass

FIELDS = ("action", "subject", "goal")
# The 22 canonical actions of the built-in data and the CPU editor, written once; synonyms map onto them.
ACTIONS = ["brighten", "darken", "increase contrast", "decrease contrast", "saturate", "desaturate", "grayscale",
           "sepia", "warm", "cool", "recolor", "blur", "sharpen", "denoise", "remove", "crop", "rotate", "flip",
           "vignette", "add grain", "pixelate", "replace background"]

# Synonyms a planner may write, per field, mapped onto the canonical words of the built-in data (DESIGN section 4).
# Per field because one word means different things in different tags ("color" the action vs a goal). Keys and
# values are already normalised (lower case, no articles, no punctuation).
SYNONYMS = {"action": {
    "lighten": "brighten", "brighter": "brighten", "increase brightness": "brighten", "brightness up": "brighten",
    "darker": "darken", "decrease brightness": "darken", "reduce brightness": "darken", "dim": "darken",
    "contrast": "increase contrast", "more contrast": "increase contrast", "boost contrast": "increase contrast",
    "reduce contrast": "decrease contrast", "less contrast": "decrease contrast", "lower contrast": "decrease contrast",
    "increase saturation": "saturate", "boost saturation": "saturate", "more saturation": "saturate",
    "decrease saturation": "desaturate", "reduce saturation": "desaturate", "mute": "desaturate",
    "greyscale": "grayscale", "gray scale": "grayscale", "grey scale": "grayscale", "black and white": "grayscale",
    "monochrome": "grayscale", "warmer": "warm", "warm up": "warm", "cooler": "cool", "cool down": "cool",
    "recolour": "recolor", "change color": "recolor", "change colour": "recolor", "color": "recolor",
    "colour": "recolor", "paint": "recolor", "blurred": "blur", "soften": "blur", "defocus": "blur",
    "sharper": "sharpen", "noise reduction": "denoise", "reduce noise": "denoise", "erase": "remove",
    "delete": "remove", "cut out": "remove", "trim": "crop", "turn": "rotate", "mirror": "flip",
    "grain": "add grain", "add noise": "add grain", "film grain": "add grain", "pixelize": "pixelate",
    "mosaic": "pixelate", "change background": "replace background", "swap background": "replace background",
    "new background": "replace background",
}, "subject": {
    "image": "whole image", "photo": "whole image", "picture": "whole image", "entire image": "whole image",
    "whole photo": "whole image", "whole picture": "whole image", "everything": "whole image", "all": "whole image",
    "bg": "background", "backdrop": "background", "man": "person", "woman": "person", "people": "person",
    "her": "person", "him": "person", "faces": "face", "words": "text", "writing": "text", "caption": "text",
    "left side": "left", "right side": "right", "top half": "top", "bottom half": "bottom", "middle": "center",
    "centre": "center", "left half": "left", "right half": "right",
}, "goal": {
    "a little": "slightly", "a bit": "slightly", "a touch": "slightly", "light": "slightly", "mild": "slightly",
    "medium": "moderately", "moderate": "moderately", "a lot": "strongly", "strong": "strongly",
    "heavily": "strongly", "heavy": "strongly", "very": "strongly", "grey": "gray", "90": "90 degrees",
    "180": "180 degrees", "270": "270 degrees", "90 degree": "90 degrees", "180 degree": "180 degrees",
    "horizontally": "horizontal", "vertically": "vertical", "blur": "blurred", "completely": "full",
}}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s:]")  # keep ':' for aspect ratios such as 16:9


def normalize(item, field):
    """'The Red-Car!' -> 'red car'; then the field's synonym table. Articles go only when something else is left."""
    syn = SYNONYMS[field]
    s = " ".join(_PUNCT.sub(" ", item.lower()).split())
    if s in syn:
        return syn[s]
    t = " ".join(_ARTICLES.sub(" ", s).split()) or s
    return syn.get(t, t)


_TAG = {f: re.compile(rf"<{f}>(.*?)</{f}>", re.S) for f in FIELDS}


def parse(text):
    """Read a decomposition. Never raises, whatever `text` is.
    Returns {'ok': bool, 'action': [...], 'subject': [...], 'goal': [...]} with normalised items; a field whose
    tag is missing is an empty list. `ok` is the paper's format check."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    text = re.sub(r"^\s*<think>.*?</think>", "", text, count=1, flags=re.S)  # optional reasoning first
    out, spans = {"ok": False}, []
    for f in FIELDS:
        found = list(_TAG[f].finditer(text))
        out[f] = [normalize(x, f) for x in found[0].group(1).split(";") if x.strip()] if found else []
        spans.append((len(found), found[0].start() if found else -1, len(found[0].group(1).split(";")) if found else 0))
    counts = [n for _, _, n in spans]
    out["ok"] = (all(k == 1 for k, _, _ in spans)                      # each tag exactly once
                 and spans[0][1] < spans[1][1] < spans[2][1]           # in order
                 and all(len(out[f]) == n for f, n in zip(FIELDS, counts))  # no empty items
                 and len(set(counts)) == 1 and counts[0] > 0)          # aligned, non-empty
    return out


def f1(pred, gold):
    """Multiset F1 of two lists of normalised items. Both empty -> 1; one empty -> 0."""
    if not pred and not gold:
        return 1.0
    return harmonic(sum((Counter(pred) & Counter(gold)).values()), len(pred), len(gold))


def harmonic(hit, n_pred, n_gold):
    """F1 from the matched amount `hit` of n_pred predicted and n_gold gold items (0 when nothing matched)."""
    if hit == 0:
        return 0.0
    p, r = hit / n_pred, hit / n_gold
    return 2 * p * r / (p + r)


def edit_f1(pred, gold):
    """F1 of two plans compared edit by edit: each predicted (action, subject, goal) is paired with at most one gold
    edit, the pairing that matches the most fields, and a pair counts the share of its three fields that agree.
    pred, gold: dicts of aligned normalised lists. Unlike the per-field F1, which compares each field's multiset
    apart, a second edit with the right subject and goal under the wrong action still earns 2/3 of an edit, and an
    edit left out loses its whole share of the recall."""
    P, Gd = (list(zip(*(d[f] for f in FIELDS))) for d in (pred, gold))
    if not P or not Gd:
        return float(not P and not Gd)
    score = [[sum(x == y for x, y in zip(p, g)) / 3 for g in Gd] for p in P]
    if len(P) > len(Gd):  # rows: the shorter plan's edits, each paired with a distinct one of the longer's
        score = [list(col) for col in zip(*score)]
    best = max(sum(score[i][j] for i, j in enumerate(pick))  # at most MAX_ITEMS edits: try every pairing
               for pick in permutations(range(len(score[0])), len(score)))
    return harmonic(best, len(P), len(Gd))


def format_plan(action, subject, goal):
    """The canonical completion for gold labels (used for the supervised cold start and in tests)."""
    return "".join(f"<{f}>{'; '.join(v)}</{f}>" for f, v in zip(FIELDS, (action, subject, goal)))


# ----------------------------------------------------------------------------------------------------------------
# Steps and their order.

# The rule order, by stage: geometry first (later masks are found on the final frame), then removals and background
# swaps (so later edits see what is left), local colour edits, global tone, finishing effects last (grain or blur
# applied early would be undone or amplified by the edits after it).
STAGES = [("crop", "rotate", "flip"), ("remove", "replace background"), ("recolor",),
          ("brighten", "darken", "increase contrast", "decrease contrast", "saturate", "desaturate", "grayscale",
           "sepia", "warm", "cool"),
          ("denoise", "sharpen", "blur", "vignette", "pixelate", "add grain")]
STAGE = {a: i for i, actions in enumerate(STAGES) for a in actions}
@dataclass
class Step:
    action: str
    subject: str
    goal: str

    @property
    def text(self):
        """The atomic sub-request, in words: 'recolor the coat: scarlet'."""
        return f"{self.action} the {self.subject}" + (f": {self.goal}" if self.goal and self.goal != "full" else "")


def rule_order(steps):
    """Stable sort by stage; actions the table does not know (a generative editor's free text) go with tone."""
    return sorted(steps, key=lambda s: STAGE.get(s.action, 3))
