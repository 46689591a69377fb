"""
The built-in requests: how people ask for each operation, templates and the generator of the train/test splits.

    python phrasings.py                 # print a few samples of each split
    python phrasings.py data/builtin    # write data/builtin/train and data/builtin/test as dataset folders

Requests are made on data.py's built-in images, with the subjects each has. A sample: {"image": "chelsea",
"instruction": "Make the cat much brighter and blur the background a little", "action": ["brighten", "blur"],
"subject": ["cat", "background"], "goal": ["strongly", "slightly"], "template": "brighten/1+blur/0"}, 1-3 edits
aligned by position. Half the requests are one edit, 2/5 join 2-3 edits, 1/10 are composites: one indirect phrase
meaning several edits ("make it look like an old photograph").

The test split measures generalisation, not memory:
  - templates: every third template of an action (index % 3 == 2) is test-only, the rest train-only;
  - combinations: a request of 2-3 edits (random or composite) belongs to the split given by a stable hash
    (zlib.crc32, not Python's salted hash()) of its sorted actions, about a third to test; so some composites are
    test-only (dreamy, noir, night), and no combination of actions in test is ever seen in train;
  - single edits occur in both splits, each only through its split's templates.
`TEMPLATE_SPLIT` gives the split of every template id; `sample["template"]` names those that made a sample.
`load_requests` gives either a split or a dataset folder's labelled requests (data.read_folder), as train.py reads.
Simplified: requests come from templates, not people, and share one small vocabulary with the CPU editor.
"""
import pathlib
import random
import re
import sys
import zlib

from data import COLORS, REGIONS, SHAPES, DataError, image_names, image_subjects, read_folder, write_folder
from plan import ACTIONS

AMOUNTS = ["slightly", "moderately", "strongly"]
GOALS = {a: AMOUNTS for a in ACTIONS}
GOALS.update({a: ["full"] for a in ("grayscale", "sepia", "remove")})  # actions without a parameter
GOALS.update(recolor=[*COLORS, "scarlet", "copper", "teal", "white", "black"],
             crop=["square", "16:9", "4:3", "3:2", "5:4"], flip=["horizontal", "vertical"],
             rotate=["90 degrees", "180 degrees", "270 degrees", "45 degrees", "5 degrees counterclockwise",
                     "10 degrees clockwise", "15 degrees counterclockwise"])  # small turns: straightening
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

# More ways to ask, for the train split only: imperatives (DO, which a request may also wrap in a question or a
# "please": DO_FRAMES) and complaints or wishes (SAY). Written apart from the test templates above: no train request
# contains a test template's wording (tests/test_data.py checks), so the test split still measures phrasings the
# planner never saw.
MORE_DO = _table("""
brighten | make {s} {cmp} lighter | light up {s} {amt} | brighten up {s} {amt} | raise the exposure of {s} {amt}
    | boost the brightness of {s} {amt} | lift the shadows of {s} {amt} | turn up the brightness on {s} {amt}
darken | make {s} {cmp} dimmer | dim {s} {amt} | tone down the brightness of {s} {amt}
    | turn down the brightness on {s} {amt} | bring the exposure of {s} down {amt} | make {s} {cmp} moodier
increase contrast | raise the contrast of {s} {amt} | make {s} {cmp} more contrasty | give {s} {cmp} more contrast
    | crank up the contrast of {s} {amt} | deepen the contrast in {s} {amt}
    | make the darks and lights of {s} {cmp} further apart
decrease contrast | soften the contrast of {s} {amt} | flatten {s} {amt} | make {s} {cmp} flatter
    | take some contrast out of {s} {amt} | tone down the contrast of {s} {amt} | make the tones of {s} {cmp} gentler
saturate | make {s} {cmp} more colorful | intensify the colors of {s} {amt} | make the colors in {s} pop {amt}
    | enrich the colors of {s} {amt} | pump up the saturation of {s} {amt} | give {s} {cmp} richer colors
desaturate | mute the colors of {s} {amt} | make {s} {cmp} less colorful | take the saturation of {s} down {amt}
    | soften the colors of {s} {amt} | lower the saturation of {s} {amt} | give {s} {cmp} calmer colors
grayscale | turn {s} black and white | make {s} monochrome | convert {s} to black and white
    | turn {s} into a monochrome picture | give {s} a black and white look | strip the color from {s}
sepia | give {s} a sepia tone | add a sepia effect to {s} | tint {s} sepia | make {s} look sepia toned
    | put a sepia filter on {s} | give {s} the brown tint of an antique print
warm | make the colors of {s} {cmp} warmer | give {s} a {adj} warm tint | add an orange glow to {s} {amt}
    | make the light in {s} {cmp} more golden | heat up the colors of {s} {amt} | push {s} toward yellow {amt}
cool | make {s} {cmp} colder | give {s} a {adj} blue tint | chill {s} {amt} | push the colors of {s} toward blue {amt}
    | cool off {s} {amt} | lower the color temperature of {s} {amt}
recolor | make {s} {g} | color {s} {g} | change {s} to {g} | dye {s} {g} | switch the color of {s} to {g}
    | repaint {s} in {g}
blur | soften {s} {amt} | blur out {s} {amt} | make {s} {cmp} fuzzier | throw {s} out of focus {amt}
    | add a {adj} blur to {s} | smudge {s} {amt}
sharpen | make {s} {cmp} more detailed | crisp up {s} {amt} | bring {s} into focus {amt}
    | enhance the detail of {s} {amt} | add clarity to {s} {amt} | make the edges in {s} {cmp} crisper
denoise | clean up the noise in {s} {amt} | smooth out the grain in {s} {amt} | reduce the grain in {s} {amt}
    | make {s} {cmp} smoother | clean up {s} {amt} | take the noise out of {s} {amt}
remove | take {s} out | remove {s} from the picture | wipe out {s} | clear {s} away | cut {s} out of the photo
    | make {s} disappear
crop | change the aspect ratio of {s} to {g} | recrop {s} at {g} | make the frame of {s} {g}
    | crop {s} so it is {g} | cut {s} to a {g} format
rotate | rotate {s} {g} | turn {s} around by {g} | give {s} a turn of {g} | straighten {s} by rotating it {g}
    | swing {s} around {g}
flip | flip {s} around {g} | mirror-image {s} {g} | turn {s} over {g}
vignette | put a {adj} vignette on {s} | dim the edges of {s} {amt} | fade the borders of {s} to dark {amt}
    | make the edges of {s} {cmp} darker | frame {s} with a {adj} dark vignette
add grain | add some {adj} grain to {s} | put {adj} film grain on {s} | add {adj} noise to {s}
    | make {s} look like film {amt} | sprinkle {adj} grain over {s} | roughen {s} with {adj} grain
pixelate | pixelize {s} {amt} | turn {s} into {adj} pixels | make {s} {cmp} pixelated | obscure {s} with {adj} pixels
    | break {s} up into {adj} squares
replace background | replace {s} by {g} | switch {s} to {g} | put the subject in front of {g} | change {s} into {g}
    | use {g} for {s}
""")
MORE_SAY = _table("""
brighten | {s} is {too} dim | {s} looks {too} murky | {s} seems {too} underexposed | {s} came out {too} shadowy
darken | {s} is {too} light | {s} came out {too} bright | {s} is {too} glaring | {s} looks {too} blown out
increase contrast | {s} is {too} low in contrast | {s} is {too} lacking in punch | {s} has {too} little contrast
    | {s} looks {too} grey and lifeless
decrease contrast | {s} is {too} contrasty | {s} has {too} much contrast | {s} looks {too} punchy
saturate | {s} looks {too} pale | {s} looks {too} drab | {s} is {too} lacking in color | the colors of {s} are {too} weak
desaturate | {s} is {too} saturated | the colors in {s} are {too} garish | {s} looks {too} vivid
    | the colors of {s} are {too} intense
grayscale | I want {s} without any color | {s} would look better in black and white | {s} should be monochrome
sepia | {s} should have an old brown sepia look | I want {s} in sepia | {s} would look nice in antique brown
warm | {s} feels {too} chilly | {s} looks {too} blue | {s} looks {too} cold and clinical
cool | {s} looks {too} orange | {s} looks {too} yellow | {s} feels {too} hot | {s} is {too} golden
recolor | I want {s} in {g} | {s} should be {g} | {s} would look better {g}
blur | {s} is {too} busy | {s} is {too} detailed and steals attention | {s} pulls the eye away, soften it {amt}
sharpen | {s} is {too} fuzzy | {s} looks {too} blurry | {s} looks {too} mushy | {s} is {too} lacking in detail
denoise | {s} is {too} grainy | {s} has {too} much noise | {s} looks {too} gritty
remove | {s} ruins the shot | I wish {s} were not in the photo | {s} has to go
crop | I need {s} in {g} | {s} should be {g} | {s} has to fit a {g} frame
rotate | {s} is tilted, turn it {g} | {s} is the wrong way up, it needs {g}
flip | {s} faces the wrong direction, mirror it {g} | I want {s} reversed {g}
vignette | I want {s} to have {adj} dark corners | the corners of {s} are {too} bright
add grain | {s} looks {too} plasticky | {s} looks {too} sterile | {s} needs a {adj} filmic texture
pixelate | I want {s} unrecognizable behind {adj} pixels | {s} should be anonymized with {adj} pixels
replace background | I want {g} instead of {s} | {s} should be {g} | {s} is ugly, put {g} there
""")
DO_FRAMES = ["please {t}", "can you {t}?", "could you {t}, please?", "I'd like you to {t}", "{t}, thanks",
             "would you {t}?"]

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


def templates(action, split):
    """[(template id, template)] of an action in a split: the test split has TEMPLATES' test columns; the train
    split their train columns and the train-only MORE_DO and MORE_SAY."""
    rows = [(f"{action}/{i}", t) for i, t in enumerate(TEMPLATES[action])]
    if split == "train":
        rows += [(f"{action}/{kind}{i}", t) for kind, table in (("d", MORE_DO), ("s", MORE_SAY))
                 for i, t in enumerate(table[action])]
    return [(i, t) for i, t in rows if TEMPLATE_SPLIT[i] == split]


def combo_split(actions):
    """The split that owns a combination of 2-3 actions: a stable hash of the sorted actions, ~1/3 to test."""
    return "test" if zlib.crc32("+".join(sorted(actions)).encode()) % 3 == 0 else "train"


TEMPLATE_SPLIT = {f"{a}/{i}": "test" if i % 3 == 2 else "train" for a, ts in TEMPLATES.items() for i in range(len(ts))}
TEMPLATE_SPLIT.update({f"{a}/{kind}{i}": "train" for kind, table in (("d", MORE_DO), ("s", MORE_SAY))
                       for a, ts in table.items() for i in range(len(ts))})
TEMPLATE_SPLIT.update({f"{c}/{i}": combo_split([a for a, _ in edits]) for c, (says, edits) in COMPOSITES.items()
                       for i in range(len(says))})


DIRECT = {f"{a}/{i}" for a in TEMPLATES for i in range(4)} | {f"{a}/d{i}" for a, ts in MORE_DO.items()
                                                            for i in range(len(ts))}  # imperatives: DO_FRAMES fit


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
    mine = {a: templates(a, split) for a in TEMPLATES}
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
            ids = [i for i, _ in picks]
            parts = [render(rng, t, a, s, g) for (_, t), (a, s, g) in zip(picks, edits)]
            text = parts[0] + "".join(rng.choice(JOINERS) + p for p in parts[1:])
            if split == "train" and len(ids) == 1 and ids[0] in DIRECT and rng.random() < 0.3:
                text = rng.choice(DO_FRAMES).format(t=text)
        samples.append({"image": image, "instruction": text[0].upper() + text[1:], "action": [e[0] for e in edits],
                        "subject": [e[1] for e in edits], "goal": [e[2] for e in edits], "template": "+".join(ids)})
    return samples


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


if __name__ == "__main__":
    for split in ("train", "test"):
        if len(sys.argv) > 1:
            print(f"wrote {write_folder(make_split(split), pathlib.Path(sys.argv[1]) / split)}")
        else:
            for s in make_split(split, 5):
                print(f"{split:5} {s['image']:18} {s['instruction']}\n      {s['action']} {s['subject']} {s['goal']}")
