"""
Edit an image with a natural-language request, on a machine without a GPU.

    python edit.py photo.png "make her coat red and blur the background"
    python edit.py photo.png "it is far too dark" --adapter runs/default/adapter --out dark_fixed.png --compare
    python edit.py photo.png "crop it square" --preset tiny --force      # any preset; --force overwrites --out
    python edit.py photo.png "make the car red" --preset gpu24          # a CUDA GPU: Qwen2.5-VL-7B sees the photo,
                                        # OWLv2 + SAM find the car, FLUX.1-Kontext (NF4) edits it
    python edit.py photo.png "..." --preset gpu24 --editor pix2pix --regions cpu   # any editor, any region agents

What happens: the perception agents describe the image in a line of text (the cpu planner cannot see), the planner
(the decomposition agent: base model + a trained LoRA adapter) writes <action><subject><goal>, the sequencing agent
orders the items into sub-requests, and for each one a region agent finds where it applies and the CPU retouch
editor changes those pixels. Perception and regions run on a copy of at most 512 pixels a side; the edits are
applied to the full-resolution image. From Python, `edit_image(image, instruction, load_planner(preset, adapter,
64))` does this to a PIL image with a planner loaded once (app.py, the editing page, calls it); agents load lazily.

Writes: the edited image (`--out`, default `<image>_edited.png` beside the input), a JSON trace beside it
(`<out>.json`: plan, order, every step's region, agent, time and error, the agents loaded), and with `--compare` a
side-by-side picture (`<out>_compare.png`). Nothing is overwritten without `--force`, and never the input (not
through a symlink or hard link either). Every check of the arguments, the adapter and the output paths and format
runs before any model loads, so a mistake costs no waiting.
On the cpu preset the planner decodes under rollout.PlanGrammar (`--no-constrain` turns it off): it can only name
actions and goals the CPU editor has, so its plan always runs.

An animated or multi-page image (GIF, APNG, WebP, TIFF, MPO) is edited on its first frame only, and the output is a
still; the screen and the trace (`frames_in`) say how many frames the input had. Why not every frame: the planner
and the region agents look at one picture, a mask found anew on each frame would flicker, and the time would grow
with the frame count; why not refuse: the user would have to extract the first frame to get the same result.

Adapter and preset: an adapter only goes with the planner it was trained on, whose preset is read from its run's
config.json (train.py writes it), else from the base model in its adapter_config.json. With no `--adapter`, the
newest adapter under `runs/` of the preset (`--preset`, default cpu) is used, else the base planner; adapters of
other presets, or of one that cannot be told, are skipped and counted. `--adapter` alone sets the preset to the
adapter's; with `--preset` too, the two must match (an error, before any model loads, if not). An adapter given by
hand whose preset cannot be told is used with the preset asked for, with a warning.

The cpu and tiny planners run from their NF4 weights stored dequantized, with the adapter merged in: the 4-bit
model's numbers, faster on a CPU, computed by `llama.py` without importing transformers or peft (see `load_planner`).

On gpu24 the planner is dropped once the plan is ordered, before the region agent and editor load (the memory plan
of memory.py: they are never resident together); crop, rotate and flip always go to the CPU editor (exact).

Simplified: the sequencing agent's model answer is used for the gpu24 preset; the 135M cpu planner zero-shot only
repeats the order it is given (see the README), so the cpu preset orders with rules unless `--sequencer=model`.
"""
import argparse
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data import DataError, open_image, to_rgb
from plan import parse
from planner import PRESETS, adapter_preset, cache_dir, dequantized_folder, newest_adapter, planner_folder
from planner import load_planner as load_base


def choose_adapter(args, root="runs"):
    """(adapter or None, preset): each taken from the other when not given, and never a pair that does not match.
    Exits, before any model loads, on an adapter folder that is not one or that contradicts an explicit --preset."""
    if args.adapter:
        adapter = Path(args.adapter)
        if not (adapter / "adapter_config.json").exists():
            sys.exit(f"error: {adapter} is not an adapter folder (no adapter_config.json); train one with "
                     "`make train`")
        trained, how = adapter_preset(adapter)
        if trained and args.preset is None:
            print(f"preset: {trained} (from {how})")
            return adapter, trained
        preset = args.preset or "cpu"
        if trained and trained != preset:
            sys.exit(f"error: {adapter} was trained for the {trained} preset (from {how}), not for --preset "
                     f"{preset}; drop --preset to use it with {trained}, or give a {preset} adapter")
        if trained is None:  # given by hand: trust it; a wrong one fails loudly when merged (planner.merge_lora)
            print(f"warning: cannot tell which preset {adapter} was trained for ({how}); using it with the "
                  f"{preset} planner")
        return adapter, preset
    preset = args.preset or "cpu"
    if args.base:
        return None, preset
    # An adapter of unknown preset is skipped here too: a guess is acceptable only when the user named the folder.
    found = [adapter_preset(p.parent)[0] for p in Path(root).glob("*/adapter/adapter_config.json")]
    others = [k or "of unknown preset" for k in found if k != preset]
    if others:
        counts = ", ".join(f"{others.count(k)} {k}" for k in sorted(set(others)))
        print(f"skipped {len(others)} adapter(s) under {root}/ that are not for the {preset} preset: {counts} "
              "(an adapter only fits its own preset's planner; name one with --adapter to use it)")
    return newest_adapter(root, preset), preset


def check_adapter(adapter):
    """Exit, before any model loads, if an adapter's weights are missing or not a safetensors file (random bytes, a
    copy cut short): safetensors' own error ("header too large") names no file. Reads the header only."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        sys.exit(f"error: {adapter} has no adapter_model.safetensors (the LoRA weights train.py saves)")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(weights, "np") as f:
            f.keys()
    except SafetensorError as e:
        sys.exit(f"error: {weights} is damaged, not a safetensors file ({e}); copy the adapter again or retrain it")


KEEPS_ALPHA = (".png", ".webp", ".tif", ".tiff")  # output formats that keep the input's transparency (RGBA)


def check_format(out):
    """Exit unless PIL can write `out`'s format in the mode edit.py gives it: RGB, and RGBA for KEEPS_ALPHA. PIL
    reads about 70 extensions but writes fewer: .psd, .xpm, .fits have no writer, .xbm and .palm take only 1-bit or
    palette images, .h5 and .grib need a plugin. A 1-pixel trial save into memory tells, before any work."""
    import io

    from PIL import Image
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        sys.exit(f"error: cannot write {out}: unknown image extension {out.suffix!r} (use .png or .jpg)")
    if fmt not in Image.SAVE:
        sys.exit(f"error: cannot write {out}: PIL reads {fmt} images but cannot write them (use .png or .jpg)")
    for mode in ("RGB", "RGBA") if out.suffix.lower() in KEEPS_ALPHA else ("RGB",):
        try:
            Image.new(mode, (1, 1)).save(io.BytesIO(), fmt)
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot write {out}: PIL cannot save an {mode} image as {fmt} ({e}); use .png or .jpg")


def _tmp(path):
    """The temporary name save_atomic writes `path` through."""
    return path.with_name(f".{path.name}.tmp{path.suffix}")


def output_paths(args):
    """(image, trace, compare) paths. Exits before any work if one of them, or the temporary file it is written
    through, is the input (by name, symlink or hard link; with --force too), is a folder, exists without --force,
    or cannot be written."""
    src = Path(args.image)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}_edited.png")
    check_format(out)
    paths = (out, out.with_suffix(".json"), out.with_name(f"{out.stem}_compare.png") if args.compare else None)
    for p, what in zip(paths, ("--out", "the trace", "the compare picture")):
        for q in (p, _tmp(p)) if p else ():  # samefile: the same file by name, through a symlink or a hard link
            if q.exists() and src.exists() and os.path.samefile(q, src):
                sys.exit(f"error: {q} ({what if q == p else 'the temporary file of ' + what}) is the input image; "
                         "edit.py never writes over its input, choose another --out")
    folders = [str(p) for p in paths if p is not None and p.is_dir()]
    if folders:
        sys.exit(f"error: cannot write {folders[0]}: it is a folder; choose another --out")
    taken = [str(p) for p in paths if p is not None and p.exists()]
    if taken and not args.force:
        sys.exit(f"error: {', '.join(taken)} already exists; pass --force to overwrite or choose another --out")
    if not out.parent.is_dir():
        sys.exit(f"error: cannot write {out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        sys.exit(f"error: cannot write {out}: folder {out.parent} is not writable")
    return paths


def check_instruction(text):
    text = " ".join(text.split())
    if not text:
        sys.exit('error: the instruction is empty; say what to change, e.g. "make the sky bluer"')
    if not any(c.isalpha() for c in text):
        sys.exit(f"error: the instruction {text!r} has no words; say what to change")
    if len(text) > 1000:
        sys.exit(f"error: the instruction is {len(text)} characters long; keep it under 1000 (one request)")
    return text


def compare_picture(before, after, instruction, trace):
    """before | after at the same height, the request and the steps as captions underneath."""
    from PIL import Image, ImageDraw, ImageFont
    h = 384
    a, b = (im.resize((max(1, round(im.width * h / im.height)), h)) for im in (before, after))
    lines = [f"request: {instruction}"] + [f"{r['step']}. {r['text']}  [{r.get('region', '')}]"
                                            + (f"  FAILED: {r['error']}" if "error" in r else "") for r in trace]
    font = ImageFont.load_default(size=14)
    pic = Image.new("RGB", (a.width + b.width + 8, h + 20 * len(lines) + 12), "white")
    pic.paste(a, (0, 0))
    pic.paste(b, (a.width + 8, 0))
    d = ImageDraw.Draw(pic)
    for i, line in enumerate(lines):
        d.text((6, h + 6 + 20 * i), line[:160], "black", font)
    return pic


def save_atomic(write, path):
    """Write to a temporary name, then rename: an interrupted run never leaves half a file at `path`."""
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_planner(preset, adapter, max_new_tokens, sequencer_model=False, constrain=False, planner_name=None):
    """(planner, write): `write(instruction, description, image)` is the planner's greedy answer; `planner` is
    the transformers planner `agents.sequence` needs for `--sequencer=model` (else None). A Llama planner is run by
    llama.py, which saves the ~4 s transformers' model classes take to import; the others by transformers.
    `constrain`: decode with rollout.PlanGrammar (only what the CPU editor can run). The VLM presets (gpu24,
    tiny_vl) load Qwen2.5-VL (`planner_name`: a hub id or folder), which reads the image itself."""
    from agents import greedy_plans
    from rollout import build_prompt, plan_grammar, stop_ids
    if preset in ("cpu", "tiny") and not sequencer_model:
        import llama
        model, tok = llama.load(dequantized_folder(planner_folder(preset)), adapter)
        grammar = plan_grammar(tok) if constrain else None
        return None, lambda x, d, im: tok.decode(model.greedy(build_prompt(tok, x, d), max_new_tokens,
                                                              stop_ids(tok), grammar), skip_special_tokens=True)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a command line prints its own lines, not a bar per weight file
    if preset in ("gpu24", "tiny_vl"):
        import memory
        import vlm
        device, dtype, _ = memory.pick_device()
        name = planner_name or (vlm.MODELS["7b"] if preset == "gpu24" else str(vlm.tiny_folder(
            cache_dir() / "tiny-qwen2.5-vl")))
        planner = vlm.load(name, adapter=adapter, device=device, dtype=dtype)
    else:
        planner = load_base(preset, adapter=adapter, dequantized=True)
    grammar = plan_grammar(planner.tok) if constrain else None
    return planner, lambda x, d, im: greedy_plans(planner, [x], max_new_tokens, descriptions=[d], grammar=grammar,
                                                  images=[im])[0]


class RequestFailed(Exception):
    """edit_image could not carry out a request: the planner wrote no plan, or no step could be applied."""


def agent_calls(editor="retouch", regions="cpu", seed=0):
    """(find, edit) for agents.run_steps: None for the CPU region agents and the CPU editor, else calls of the
    grounding agent and of the diffusers editor `editor`, each loaded from the registry on its first use."""
    import agents
    find = edit = None
    if regions == "grounding":
        find = lambda im, subject: agents.agent("grounding").find(im, subject)  # noqa: E731
    if editor != "retouch":
        import torch
        gen = torch.Generator().manual_seed(seed)  # one generator for the run: same request and image, same result
        edit = lambda im, step, mask: agents.agent(editor)(im, step, mask, generator=gen)  # noqa: E731
    return find, edit


def carry_alpha(result, alpha, steps, trace):
    """Put the input's transparency (an "L" image) on `result`, moved with the crops, turns and flips that ran."""
    import numpy as np
    from PIL import Image

    import agents
    geometry = agents.agent("retouch").GEOMETRY
    moves = [s for s, r in zip(steps, trace) if s.action in geometry and "error" not in r]
    if moves:
        alpha = Image.fromarray(agents.run_steps(np.repeat(np.asarray(alpha)[..., None], 3, -1), moves)[0][..., 0])
    result.putalpha(alpha)


def edit_image(image, instruction, planner, description=None, editor="retouch", regions="cpu", sequencer="rules",
               alpha=None, seed=0, log=print, masks=None):
    """Edit a PIL RGB image as `instruction` asks: (edited image, trace {"planner_output", "plan", "sequencing",
    "steps", "seconds"}); RequestFailed if the planner writes no plan or no step applies. `planner`: load_planner's
    (planner, write) pair; `description`: describe(image) for a text-only planner, else None; `editor`, `regions`:
    the agents (as --editor, --regions); `sequencer`: "model" or "rules"; `alpha`: an "L" image to carry over.
    The memory plan: unless both agents are the CPU ones, the planner is dropped once the steps are ordered, before
    they load; it is freed only if the caller keeps no reference of its own (`main` hands its only one over).
    `masks`: a list that gets each step's region mask (see agents.run_steps)."""
    import numpy as np
    from PIL import Image

    import agents
    from regions import WORK_SIZE
    model, write = planner
    seconds, t0 = {}, time.time()
    text = write(instruction, description, image)
    seconds["plan"] = round(time.time() - t0, 2)
    plan = parse(text)
    log(f"planner output: {text!r}")
    if not plan["ok"]:
        raise RequestFailed("the planner's output does not follow the <action><subject><goal> format, so there is "
                            "nothing to apply (an untrained planner rarely does; train one with `make train`)")
    t0 = time.time()
    steps, how = agents.sequence(plan, model if sequencer == "model" else None)
    seconds["sequence"] = round(time.time() - t0, 2)
    log(f"order ({how}):")
    for i, s in enumerate(steps):
        log(f"  {i + 1}. {s.text}")
    if editor != "retouch" or regions != "cpu":
        planner = model = write = None  # the memory plan: the planner leaves before the region agents and editor load
        agents.unload()
    find, edit = agent_calls(editor, regions, seed)
    t0 = time.time()
    edited, trace = agents.run_steps(np.asarray(image), steps, WORK_SIZE, find=find, edit=edit, masks=masks)
    seconds["steps"] = round(time.time() - t0, 2)
    for r in trace:
        log(f"  step {r['step']}: {r['text']:<40} {r.get('region', '')} ({r['seconds']:.2f}s)"
            + (f"  FAILED: {r['error']}" if "error" in r else ""))
    if all("error" in r for r in trace):
        raise RequestFailed("no step could be applied (see above)")
    result = Image.fromarray(edited)
    if alpha is not None:  # transparency survives the edit
        carry_alpha(result, alpha, steps, trace)
    return result, {"planner_output": text, "plan": {k: plan[k] for k in ("action", "subject", "goal")},
                    "sequencing": how, "steps": trace, "seconds": seconds}


def describe(image):
    """The perception agents' line of text about a PIL RGB image, read on a copy of at most 512 pixels a side."""
    import numpy as np

    import regions
    return regions.describe(regions.downscale(np.asarray(image), regions.WORK_SIZE))


def load_with_perception(args, adapter, image, sequencer_model, constrain, perceive):
    """{"planner": load_planner's pair, "description", "seconds"}, exiting if the planner cannot load. `perceive`:
    describe `image` in a thread while the planner loads (MediaPipe and ONNX Runtime work outside the GIL)."""
    seconds = {}

    def timed_describe():
        t = time.time()
        text = describe(image)
        seconds["perception"] = round(time.time() - t, 2)
        return text

    t0 = time.time()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(timed_describe) if perceive else None
        try:
            planner = load_planner(args.preset, adapter, args.max_new_tokens, sequencer_model, constrain,
                                   args.planner)
        except (NotImplementedError, RuntimeError, ValueError, OSError) as e:
            sys.exit(f"error: cannot load the {args.preset} planner" + (f" with adapter {adapter}" if adapter
                                                                         else "") + f": {e}")
        seconds["load_planner"] = round(time.time() - t0, 2)
        description = job.result() if job else None
    return {"planner": planner, "description": description, "seconds": seconds}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("instruction")
    ap.add_argument("--adapter", help="a LoRA adapter folder saved by train.py (default: the newest under runs/ "
                    "of the preset)")
    ap.add_argument("--base", action="store_true", help="use the base planner even if runs/ has an adapter")
    ap.add_argument("--preset", choices=PRESETS,
                    help="default: the --adapter's, else cpu. gpu24: Qwen2.5-VL-7B, grounding and diffusers editors "
                         "on a 24 GB GPU; tiny_vl: its code on a random tiny model")
    ap.add_argument("--planner", help="the VLM planner: a hub id or a folder (gpu24: Qwen/Qwen2.5-VL-7B-Instruct)")
    ap.add_argument("--editor", choices=["retouch", "kontext", "pix2pix", "inpaint"],
                    help="the editing agent (default: kontext on gpu24, else the CPU retouch editor)")
    ap.add_argument("--regions", choices=["cpu", "grounding"],
                    help="the region agents (default: OWLv2 + SAM grounding on gpu24, else the CPU agents)")
    ap.add_argument("--out", help="where to write the edited image (default: <image>_edited.png)")
    ap.add_argument("--compare", action="store_true", help="also write a before | after picture")
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs (never the input)")
    ap.add_argument("--sequencer", choices=["auto", "model", "rules"], default="auto",
                    help="order the edits with the base model (LoRA off) or rules; auto: model on gpu24 only")
    ap.add_argument("--describe", action=argparse.BooleanOptionalAction, default=None,
                    help="give the planner the perception text of the image (default: for text-only planners)")
    ap.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=None,
                    help="let the planner write only actions and goals the CPU editor reads (default: cpu preset)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error(f"--max_new_tokens must be at least 1, not {args.max_new_tokens}")
    return args


def check_request(args):
    """(instruction, adapter, output paths) after every check that runs before any model loads; sets args.preset."""
    instruction = check_instruction(args.instruction)
    adapter, args.preset = checked_adapter(args)
    return instruction, adapter, output_paths(args)


def checked_adapter(args):
    """(adapter or None, preset) as choose_adapter picks them from args.adapter, args.preset and args.base, the
    adapter's weights checked and the preset's device there: exits, before any model loads, if not."""
    adapter, preset = choose_adapter(args)
    if adapter:
        check_adapter(adapter)
    check_device(preset, None if args.preset is not None else adapter)
    return adapter, preset


def check_device(preset, adapter=None):
    """Exit if `preset` needs a CUDA GPU and there is none; `adapter`: the adapter the preset was read from."""
    if preset == "gpu24":
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: the gpu24 preset needs a CUDA GPU (about 24 GB) and this machine has none; "
                     + (f"{adapter} is a gpu24 adapter: leave out --adapter to use the newest cpu adapter under "
                        "runs/" if adapter else "use --preset=cpu (the default), or --preset=tiny_vl to run gpu24's "
                        "code on a tiny random model"))


def read_image(path):
    """(RGB image, alpha or None, frame count) of an image file's first frame, said on screen; exits if unread."""
    try:
        original = open_image(path)
    except DataError as e:
        sys.exit(f"error: {e}")
    rgb, alpha = to_rgb(original)
    from PIL import Image
    with Image.open(path) as im:  # open_image kept the first frame; count them all to say so
        frames = getattr(im, "n_frames", 1)
    print(f"image: {path} ({rgb.width}x{rgb.height}, mode {original.mode}"
          + (f"; {frames} frames, only the first is edited" if frames > 1 else "") + ")")
    return rgb, alpha, frames


def team(preset, editor=None, regions=None, sequencer="auto", constrain=None, describe=None):
    """The agents and switches of a request on `preset`, each taken as given or else the preset's default (as the
    options of edit.py and app.py say): editor, regions, sequencer ("model" or "rules"), constrain, describe."""
    vlm_preset = preset in ("gpu24", "tiny_vl")  # a VLM planner sees the image: no perception text by default
    return {"editor": editor or ("kontext" if preset == "gpu24" else "retouch"),
            "regions": regions or ("grounding" if preset == "gpu24" else "cpu"),
            "sequencer": "model" if sequencer == "model" or (sequencer == "auto" and preset == "gpu24") else "rules",
            "constrain": preset == "cpu" if constrain is None else constrain,
            "describe": not vlm_preset if describe is None else describe}


def make_record(trace, seconds, *, image, instruction, preset, chosen, adapter, rgb, frames, result, description,
                output):
    """The JSON trace written beside an edited image: the request, the team, the plan and every step."""
    import agents
    return {"image": str(image), "instruction": instruction, "preset": preset, "editor": chosen["editor"],
            "regions": chosen["regions"], "adapter": str(adapter) if adapter else None,
            "size_in": [rgb.width, rgb.height], "frames_in": frames, "size_out": [result.width, result.height],
            "description": description, "planner_output": trace["planner_output"],
            "constrained": chosen["constrain"], "plan": trace["plan"], "sequencing": trace["sequencing"],
            "steps": trace["steps"], "agents_loaded": agents.loaded(),
            "agent_load_seconds": {k: round(v, 2) for k, v in agents.LOAD_SECONDS.items()},
            "seconds": seconds, "output": str(output)}


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    instruction, adapter, (out, trace_path, compare_path) = check_request(args)
    chosen = team(args.preset, args.editor, args.regions, args.sequencer, args.constrain, args.describe)
    rgb, alpha, frames = read_image(args.image)

    import agents  # torch and the agents' code load here, before the perception thread starts
    warnings.filterwarnings("ignore", category=FutureWarning)
    loaded = load_with_perception(args, adapter, rgb, chosen["sequencer"] == "model", chosen["constrain"],
                                  chosen["describe"])
    description, seconds = loaded["description"], loaded["seconds"]
    newest = "" if args.adapter else f" (newest {args.preset} adapter under runs/)"
    print(f"planner: {args.preset}, " + (f"adapter {adapter}{newest}" if adapter
                                        else "base model, no adapter (train one with `make train`)"))
    if description:
        print(f"perception: {description}")
    try:  # pop: edit_image holds the planner's only reference, so that the memory plan can free it
        result, trace = edit_image(rgb, instruction, loaded.pop("planner"), description, chosen["editor"],
                                   chosen["regions"], chosen["sequencer"],
                                   alpha if out.suffix.lower() in KEEPS_ALPHA else None)
    except RequestFailed as e:
        sys.exit(f"error: {e}; nothing was written")
    save_atomic(result.save, out)
    seconds = {**seconds, **trace["seconds"], "total": round(time.time() - t_start, 2)}
    record = make_record(trace, seconds, image=args.image, instruction=instruction, preset=args.preset,
                         chosen=chosen, adapter=adapter, rgb=rgb, frames=frames, result=result,
                         description=description, output=out)
    save_atomic(lambda p: p.write_text(json.dumps(record, indent=1)), trace_path)
    if compare_path:
        save_atomic(compare_picture(rgb, result.convert("RGB"), instruction, trace["steps"]).save, compare_path)
    print(f"wrote {out} and {trace_path}" + (f" and {compare_path}" if compare_path else "")
          + f"; agents loaded: {', '.join(agents.loaded())}; {seconds['total']:.1f}s")
    return record


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # every file is written and closed: skip tearing down torch, MediaPipe and ONNX Runtime (~1 s)
