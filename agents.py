"""
The team around the planner: a lazy registry of the region and editing agents, the sequencing agent, running a
plan, and the planner's greedy plans.

    agent("face")          a region or editing agent, built on first use by LOADERS[name] (see the registry below).
    sequence(plan, planner)  ordered Steps (action, subject, goal, text): the planner's base with the adapter off,
                           or rules (plan.rule_order: geometry, removals, object colours, tone, finishing effects).
    run_steps(image, steps)  each Step's region found and edited, with a trace; a failing agent skips its step.
    greedy_plans(planner, requests)  the planner's greedy plans for a list of requests (evaluation, edit.py).
"""
import re
import time

import torch

import regions
import rollout
import vlm
from plan import Step, normalize, rule_order
from registry import LOAD_SECONDS, LOADERS, agent, loaded, unload  # noqa: F401  (one registry, also agents.*)

# ----------------------------------------------------------------------------------------------------------------
# The gpu24 agents, added to the registry here: their modules sit above the region agents that use the registry.

def _grounding():  # gpu24 regions: OWLv2 boxes refined by SAM (grounding.py), falling back to the CPU agents
    import grounding
    return grounding.load()


def _diffusion(name):  # gpu24 editors: InstructPix2Pix, SD inpainting, FLUX.1-Kontext (diffusion.py)
    def load():
        import diffusion
        return diffusion.load_editor(name)
    return load


LOADERS.update(grounding=_grounding, **{n: _diffusion(n) for n in ("pix2pix", "inpaint", "kontext")})


# ----------------------------------------------------------------------------------------------------------------
# The sequencing agent: a decomposition -> ordered atomic sub-requests.

SEQUENCER = ("You order image edits. Apply geometry (crop, rotate, flip) first, then removals and background "
             "changes, then colour changes of objects, then global tone, and finishing effects (blur, sharpen, "
             "vignette, grain, pixelate) last. Answer only with the edit numbers in order, comma separated.\n"
             "Example. Edits: 1. blur the background 2. crop the whole image: square. Answer: 2, 1")



def sequence(plan, planner=None):
    """Order a parsed plan ({'action': [...], 'subject': [...], 'goal': [...]}) into Steps.
    Returns (steps, how): how says whether the model's order was used or why the rules took over.
    The model is the planner's base with the LoRA adapter switched off (zero-shot, as in the paper, no extra memory);
    it answers with the edit numbers in order, its tokens constrained to digits, commas and spaces (a 135M model
    left free restates the list instead). Anything but a permutation (a repeat, a dropped or invented number)
    falls back to `rule_order`."""
    steps = [Step(a, s, g) for a, s, g in zip(plan["action"], plan["subject"], plan["goal"])]
    if len(steps) < 2:
        return steps, "single step: nothing to order"
    if planner is None:
        return rule_order(steps), "rules (no sequencing model)"
    listing = " ".join(f"{i + 1}. {s.text}" for i, s in enumerate(steps))
    prompt = rollout.build_prompt(planner.tok, f"Edits: {listing}", system=SEQUENCER)
    planner.policy.eval()
    with torch.no_grad(), planner.policy.disable_adapter():
        digits = planner.tok(", ".join(str(i + 1) for i in range(len(steps))) + " ,",
                             add_special_tokens=False)["input_ids"]
        roll = rollout.sample_group(planner.policy, [prompt], 1, 3 * len(steps) + 2, rollout.stop_ids(planner.tok),
                            planner.tok.pad_token_id, temperature=0, allowed=digits)
    answer = rollout.decode(planner.tok, roll)[0]
    order = [int(n) - 1 for n in re.findall(r"\d+", answer)][:len(steps)]  # a small model may run on: 1, 2, 1,
    if sorted(order) != list(range(len(steps))):
        return rule_order(steps), f"rules (the model's answer {answer.strip()[:60]!r} is not an order of " \
                                  f"1..{len(steps)})"
    return [steps[i] for i in order], f"model ({answer.strip()!r})"


@torch.no_grad()
def greedy_plans(planner, instructions, max_new_tokens, batch=16, descriptions=None, grammar=None, images=None):
    """Greedy completions (text) for a list of requests, `batch` prompts decoded together. `descriptions`: the
    perception text of each request's image, or None; `grammar`: a PlanGrammar, or None for free text; `images`:
    the PIL images of the requests, for a VLM planner (one with a processor)."""
    tok, texts = planner.tok, []
    descriptions = descriptions or [None] * len(instructions)
    planner.policy.eval()
    for i in range(0, len(instructions), batch):
        vision = None
        if planner.processor is not None:
            prompts, vision = vlm.prompts(planner, instructions[i:i + batch], images[i:i + batch])
        else:
            prompts = [rollout.build_prompt(tok, x, d)
                       for x, d in zip(instructions[i:i + batch], descriptions[i:i + batch])]
        r = rollout.sample_group(planner.policy, prompts, 1, max_new_tokens, rollout.stop_ids(tok, planner.model),
                                 tok.pad_token_id, temperature=0, grammar=grammar, vision=vision)
        texts += rollout.decode(tok, r)
    return texts


# ----------------------------------------------------------------------------------------------------------------
# Running a plan: each step's region is found on a copy of at most `work_size` pixels a side, its mask is scaled up,
# and the edit is applied at full resolution, so a 24-megapixel photo costs the region agents no more than a small
# one. Nothing here raises for a step that fails: the step is skipped and the trace says why (a planner can write
# an action no editor knows; a caller decides what a run with failed steps means).


def run_steps(image, steps, work_size=512, find=None, edit=None, masks=None):
    """Apply ordered Steps to an RGB uint8 array (H, W, 3). Returns (edited array, trace: one dict per step).
    `masks`, a list: each step that found a region appends (step number, the image the region agent saw at work
    size, its mask in [0, 1]) (for a page that draws them; the trace stays JSON).
    `find(image, subject)` -> Region replaces the region agents' `regions.find` on the current image (the outcome
    reward passes a cached one; gpu24 passes the grounding agent's). `edit(image, step, mask)` -> image replaces
    the CPU editor for every step but geometry (crop, rotate, flip stay exact): a diffusers editor, which reads any
    action text."""
    editor, trace = agent("retouch"), []
    for i, step in enumerate(steps):
        t0, rec = time.time(), {"step": i + 1, "action": step.action, "subject": step.subject, "goal": step.goal,
                                "text": step.text}
        trace.append(rec)
        action = normalize(step.action, "action")
        try:
            if edit is None and action not in editor.ACTIONS:
                raise editor.EditError(f"the CPU editor has no action {step.action!r}")
            mask = None
            if action not in editor.GEOMETRY:
                small = regions.downscale(image, work_size)
                region = (find or regions.find)(small, step.subject)
                rec.update(agent=region.agent, region=region.note, area=round(float(region.mask.mean()), 4))
                if masks is not None:
                    masks.append((i + 1, small, region.mask))
                if action == "remove" and region.agent == "whole":
                    raise editor.EditError(f"nothing to remove: {region.note}")
                mask = regions.upscale(region.mask, image.shape)
            else:
                rec.update(agent="none", region="the whole frame (geometry)", area=1.0)
            if edit is not None and action not in editor.GEOMETRY:
                image = edit(image, step, mask)
            else:
                image = editor.apply(image, action, step.goal, mask)
        except Exception as e:  # a failing agent skips its step, loudly, and the run goes on
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["seconds"] = round(time.time() - t0, 3)
    return image, trace
