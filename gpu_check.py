"""
The GPU acceptance check: everything in this repo that needs a GPU, run on one in a single command, with random
weights (no network, no downloads). It prints one table, a row per check (PASS, FAIL, or INFO: a bar reported but not
applied) with what was measured, writes gpu_check.json (in --out, default runs/gpu_check) and exits with status 1 if
any check failed. A check that raises is recorded (exception type, message, the end of its traceback, in the json)
and the next one runs: one failure never hides the others.

    make gpu-check                          # = python gpu_check.py: every check, on a CUDA GPU; budget 8 minutes
    python gpu_check.py --dry               # list the checks (name, what, bar); loads nothing, needs no GPU
    python gpu_check.py --only=planner,flux # a subset; a name before the dot picks a family: --only=tiny_vl,edit
    python gpu_check.py --tiny              # the same code on tiny configs, on the CPU (tests/test_gpu_check.py)
    GPU_CHECK_DIR=/data/gc python gpu_check.py   # where the random models are built once (default: $TMPDIR/gpu_check)

The checks, in the order they run:

tiny.paper, tiny.outcome, tiny_vl.paper, tiny_vl.outcome, tiny_vl.judge: train.py end to end on the device, one
reward each (judge needs a VLM planner): a cold start (2 SFT steps), 2 GRPO steps, the held-out evaluation
(eval_every=2), then a second call with --resume=True --steps=3, each in a fresh folder under --out. Random tiny
models write no tags, so every reward would be flat and every group dropped: the update would never run. So the
paper runs use a seeded random reward in place of the paper's (the planner check's), and in the outcome and judge
runs the reward is shown a plan and a tagless text in turn for the samples: the agents, and the judge model, really
run, and the groups have a signal (both given to train.main as its make_reward). Bar: GRPO rows for steps 1, 2, 3 with a finite loss, evaluations at steps 2 and 3,
the run on the chosen device (memory.json); paper and judge: a kept group (an update) at every step; outcome and
judge: every plan parsed and run by the agents (the outcome reward's target part is 0 for a plan that is not the
request's, so its groups may be flat and are not required to update).

edit.kontext, edit.pix2pix, edit.inpaint: `edit.py --preset=tiny_vl --editor=NAME` on a 90x60 image. The tiny VLM
planner reads it (its answer is replaced by a fixed one-step plan, "recolor the left half red": random weights write
no tags), the CPU region agents find the left half, and the editor, a tiny random pipeline of its real class
(diffusion.tiny_folder) loaded by its real loader (diffusion.load_editor: on a GPU bf16 and NF4 for kontext, fp16
for the others), edits it. Bar: the output image exists at the input's size, the step ran, the editor sat on the
chosen device.

page: the editing page's work (app.Page, what its Edit button calls) on tiny_vl with a tiny random kontext editor,
two requests, as `python app.py --preset=gpu24` runs them: the planner answers the fixed plan above, and with a GPU
editor the page keeps no planner, so each request loads it, plans, drops it, then loads the editor. Bar: both
edited images at the input's size, no planner alive (weakref, after gc) when the editor runs, none kept, the
editor on the device.

planner: configs/qwen2.5-vl-7b-instruct.json with random weights, saved once as a bf16 folder (16 GB, in
GPU_CHECK_DIR), then train.py --preset=gpu24 itself, loading that folder: NF4, LoRA r=64, B=8 prompts x G=8 samples,
128 new tokens, 448x448 images, gradient checkpointing, 2 GRPO steps, and an evaluation of 32 prompts before and
after them. The reward is the seeded random one (every group updates), and no completion stops early: the worst
case of the KV cache. The tokenizer is the tiny byte-level one (vlm.tiny_folder): text prompts are longer than with
Qwen's, and the plan is computed for the prompt length actually seen. Bar: each phase's measured peak within 20% of
the plan's (memory.py), and the allocator's reserved peak + 0.5 GB of CUDA context under 23.5 GB, what a 24 GB card
leaves one process (the allocated peak alone would hide the allocator's cache and fragmentation). Building the folder needs a GPU with >= 40 GB; on a 24 GB card,
build it elsewhere (`gpu_check.planner_folder(dir, False, "cpu")` works, slowly) and point GPU_CHECK_DIR at it.

flux: configs/flux.1-kontext-dev-transformer.json, random bf16 weights, every Linear of the blocks in NF4 (the layers
diffusers quantizes), then --flux_steps (28) denoising passes of one 1024 px Kontext edit: the target and reference
latents (2 x 4096 tokens) with 512 T5 tokens, no grad. Only the transformer: the T5 encoder, CLIP and the VAE run
before and after it (their sizes: `train.py --preset=gpu24 --dry_run=True`). Bar: the peak within 20% of the plan.
The 12B transformer is built in bf16 before its blocks are quantized: this check needs a GPU with >= 32 GB.

ranks: train.py under `torchrun --nproc_per_node=2` (NCCL, one GPU a rank) on the tiny preset in fp32, 3 GRPO steps
with a reward computed from the text (the share of lower-case letters: the same for any number of ranks), against
one process with the same settings. Bar: the two adapters within 1e-4. It needs 2 GPUs and says it was skipped with
fewer; with --tiny on a machine without a GPU it runs on the CPU with gloo (tests/test_distributed.py covers the
same on every CI run).

--tiny runs planner and flux on tiny configs: their bars are reported (INFO rows), not applied, since the plan's
coefficients are for the GPU (tests/test_memory.py compares the plan with the CPU at sizes where it holds). The other
checks are the same in both modes. Time: --tiny 1 to 1.5 minutes on 2 CPU cores; on a GPU most of the budget is the
7B folder (built and saved once, then loaded) and its two GRPO steps; the tiny checks take about a minute.
"""
import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import torch

import memory

GB = 2**30
PLAN = "<action>brighten</action><subject>whole image</subject><goal>slightly</goal>"  # every agent runs it
EDIT_PLAN = "<action>recolor</action><subject>left half</subject><goal>red</goal>"    # a region for every editor
TRAIN = [("tiny", "paper"), ("tiny", "outcome"), ("tiny_vl", "paper"), ("tiny_vl", "outcome"), ("tiny_vl", "judge")]
EDITORS = ("kontext", "pix2pix", "inpaint")


@contextmanager
def patched(obj, name, value):
    """obj.name = value inside the block, the original put back after (also when the block raises)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def random_reward(seed=0):
    """A make_reward for train.main that stands in for the paper reward: random weights write no tags (and most of
    their tokens decode to nothing), so the paper reward is flat; a seeded random one gives every group a signal and
    every step an update."""
    g = torch.Generator().manual_seed(seed)

    def reward(texts, golds):
        r = torch.rand(len(texts), generator=g)
        return r, {"format": r * 0, "f1": r, "f1_action": r, "f1_subject": r, "f1_goal": r}
    return lambda cfg, planner: reward


def decoded_as(plans):
    """A make_reward for train.main: the config's own reward, shown `plans` in turn instead of the sampled texts
    (random weights write no plans), so the agents and the judge really run and groups have a signal."""
    import reward

    def make(cfg, planner):
        score = reward.make_reward(cfg, planner)
        return lambda texts, samples: score([plans[i % len(plans)] for i in range(len(texts))], samples)
    return make


def lower_share(cfg, planner):
    """A make_reward whose reward is a function of the text alone (the share of lower-case letters), so that any
    number of ranks scores a completion alike; a random tiny model's texts vary in it."""
    def reward(texts, golds):
        r = torch.tensor([sum(c.islower() for c in t) / max(len(t), 1) for t in texts])
        return r, {"format": r * 0, "f1": r, "f1_action": r, "f1_subject": r, "f1_goal": r}
    return reward


def fresh(folder):
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# train.py and edit.py end to end on tiny models

def check_train(ctx, preset, reward_name):
    """Cold start, 2 GRPO steps, evaluation, then resume to step 3, with one reward; see the docstring."""
    import train
    run = fresh(ctx.out / f"{preset}.{reward_name}")
    args = [f"--preset={preset}", f"--reward={reward_name}", f"--out_dir={run}", "--sft_steps=2", "--steps=2",
            "--eval_every=2", "--save_every=2", "--outcome_size=64"]
    # the reward sees a plan and a tagless text in turn: runs that score, groups with a signal
    make = random_reward() if reward_name == "paper" else decoded_as([PLAN, "no tags"])
    train.main(train.parse_args(args), make)
    train.main(train.parse_args(args + ["--steps=3", "--resume=True"]), make)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    grpo = [r for r in rows if r["phase"] == "grpo"]
    evals = [r["step"] for r in rows if r["phase"] == "eval"]
    device = json.loads((run / "memory.json").read_text())["device"]
    problems = []
    if [r["step"] for r in grpo] != [1, 2, 3]:
        problems.append(f"GRPO rows for steps {[r['step'] for r in grpo]}, not [1, 2, 3]")
    if not all(math.isfinite(r["loss"]) for r in grpo):
        problems.append(f"non-finite loss: {[r['loss'] for r in grpo]}")
    # The outcome reward's target part is 0 for a plan that is not the request's, so its groups may all be flat.
    if reward_name != "outcome" and not all(r["kept_groups"] > 0 for r in grpo):
        problems.append(f"a step kept no group (the update did not run): {[r['kept_groups'] for r in grpo]}")
    if reward_name != "paper" and not all(r.get("parsed") == 0.5 and r.get("failed") == 0 for r in grpo):
        problems.append(f"the agents did not run every decoded plan: parsed {[r.get('parsed') for r in grpo]}, "
                        f"failed {[r.get('failed') for r in grpo]}")
    if evals != [2, 3]:
        problems.append(f"evaluations at steps {evals}, not [2, 3]")
    if device != ctx.device:
        problems.append(f"ran on {device}, not {ctx.device}")
    last = grpo[-1] if grpo else {}
    measured = (f"{device}, steps {[r['step'] for r in grpo]}, loss {last.get('loss', float('nan')):+.4f}, reward "
                f"{last.get('reward', float('nan')):.3f}, kept {[r['kept_groups'] for r in grpo]}, evals {evals}")
    return {"measured": measured, "problems": problems, "details": {"grpo": grpo, "evals": evals, "device": device}}


RANKS_ARGS = ["--preset=tiny", "--dtype=float32", "--steps=3", "--eval_every=3", "--save_every=3"]


def check_ranks(ctx):
    """train.py in one process, then under torchrun with 2 ranks: the same adapter; see the docstring."""
    import subprocess

    import train
    from safetensors.torch import load_file
    if (ctx.device == "cuda" or not ctx.tiny) and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU on this machine; the check needs 2 or more",
                "measured": "", "problems": []}
    one, two, seconds = fresh(ctx.out / "ranks.one"), fresh(ctx.out / "ranks.two"), {}
    t = time.time()
    train.main(train.parse_args(RANKS_ARGS + [f"--out_dir={one}"]), lower_share)
    seconds[1] = time.time() - t
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                          f"--ranks_run={two}"], env=env, capture_output=True, text=True, timeout=600)
    seconds[2] = time.time() - t
    if run.returncode:
        return {"measured": f"torchrun exited with {run.returncode}", "problems": [run.stderr[-2000:]]}
    a, b = (load_file(f / "adapter" / "adapter_model.safetensors") for f in (one, two))
    diff = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
    grpo = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"grpo"' in x]
    problems = [f"the adapters differ by {diff:.2e} (bar 1e-4)"] if not diff < 1e-4 else []
    if [r["step"] for r in grpo] != [1, 2, 3] or not all(r["kept_groups"] > 0 for r in grpo):
        problems.append(f"2 ranks: steps {[r['step'] for r in grpo]}, kept {[r['kept_groups'] for r in grpo]}")
    how = "NCCL, 2 GPUs" if ctx.device == "cuda" else "gloo, CPU"
    return {"measured": f"2 ranks ({how}): adapter max |diff| {diff:.1e} vs 1 process; whole run "
                        f"{seconds[2]:.0f}s vs {seconds[1]:.0f}s", "problems": problems}


@contextmanager
def fixed_answer(seen=None):
    """edit.load_planner's planners answer EDIT_PLAN inside the block, after their real call (the VLM reads the image
    on the device; random weights write no plan). `seen(answer)` is told of each answer function made."""
    import edit
    real = edit.load_planner

    def load(*a, **kw):
        planner, write = real(*a, **kw)

        def answer(x, d, image):
            write(x, d, image)
            return EDIT_PLAN
        if seen:
            seen(answer)
        return planner, answer
    with patched(edit, "load_planner", load):
        yield


def tiny_editor(ctx, name):
    """The registry loads the diffusers editor `name` as a tiny random pipeline of its real class, by its real loader
    (diffusion.load_editor), inside the block."""
    import agents  # noqa: F401  its import adds the gpu24 loaders to the registry: before the patch, not into it
    import diffusion
    import registry
    folder = diffusion.tiny_folder(ctx.models / "tiny-pipelines" / name, name)
    loader = lambda: diffusion.load_editor(name, model=folder, steps=2, size=32)  # noqa: E731
    return patched(registry, "LOADERS", {**registry.LOADERS, name: loader})


def placement(editor):
    """Where a diffusers editor sits: "cuda bfloat16 + NF4"."""
    return f"{editor.device} {str(editor.dtype).replace('torch.', '')}" + (" + NF4" if editor.quantize else "")


def check_edit(ctx, name):
    """edit.py --preset=tiny_vl with the diffusers editor `name` as a tiny random pipeline; see the docstring."""
    import numpy as np
    from PIL import Image

    import edit
    import registry
    run = fresh(ctx.out / f"edit.{name}")
    src, out = run / "in.png", run / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(src)
    registry.unload(name)
    try:
        with fixed_answer(), tiny_editor(ctx, name):
            rec = edit.main([str(src), "make the left half red", "--preset=tiny_vl", f"--editor={name}", "--base",
                             "--max_new_tokens=4", f"--out={out}", "--force"])
            ed = registry.agent(name)  # loaded by the run: its device, dtype and NF4
            where = placement(ed)
    finally:
        registry.unload(name)
    problems = [f"step {r['step']} failed: {r['error']}" for r in rec["steps"] if "error" in r]
    got = Image.open(out).size if out.exists() else None
    if got != (90, 60):
        problems.append(f"output {out} is {got}, not the input's (90, 60)")
    if ed.device != ctx.device:
        problems.append(f"the editor ran on {ed.device}, not {ctx.device}")
    measured = f"{name} on {where}: 90x60 -> {'x'.join(map(str, got)) if got else 'nothing'}, " \
               f"{len(rec['steps'])} step(s), regions {[r.get('agent') for r in rec['steps']]}"
    return {"measured": measured, "problems": problems, "details": {"trace": rec, "editor": where}}


def check_page(ctx):
    """The editing page's work (app.Page) as on gpu24: tiny_vl with the kontext editor, two requests; see the
    docstring."""
    import weakref

    import numpy as np
    from PIL import Image

    import agents
    import app
    import registry
    run = fresh(ctx.out / "page")
    src = run / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(src)
    real_steps, planners, freed = agents.run_steps, [], []

    def steps_after_the_planner_left(*a, **kw):
        gc.collect()
        freed.append(all(ref() is None for ref in planners))
        return real_steps(*a, **kw)
    registry.unload("kontext")
    try:
        with fixed_answer(lambda answer: planners.append(weakref.ref(answer))), tiny_editor(ctx, "kontext"), \
                patched(agents, "run_steps", steps_after_the_planner_left):
            page = app.Page("tiny_vl", editor="kontext", max_new_tokens=4, out_dir=run)
            results = [page.submit(str(src), None, "make the left half red", "base") for _ in range(2)]
            ed = registry.agent("kontext")
            where = placement(ed)
    finally:
        registry.unload("kontext")
    problems = [f"request {i + 1}: step {o[0]} failed: {o[-1]}" for i, r in enumerate(results) for o in r["order"]
                if o[-1]]
    sizes = [Image.open(r["files"][0]).size for r in results]
    if sizes != [(90, 60)] * 2:
        problems.append(f"the edited images are {sizes}, not the input's (90, 60)")
    if freed != [True, True] or page.planners:
        problems.append(f"the planner was still held when the editor ran ({freed}), or kept ({list(page.planners)})")
    if ed.device != ctx.device:
        problems.append(f"the editor ran on {ed.device}, not {ctx.device}")
    return {"measured": f"2 requests, kontext on {where}: 90x60 -> {sizes}, the planner freed before the editor "
                        f"ran: {freed}", "problems": problems, "details": {"statuses": [r["status"] for r in results]}}


# ----------------------------------------------------------------------------------------------------------------
# The real-size architectures with random weights, measured against the memory plan

def planner_folder(root, tiny, device):
    """A Qwen2.5-VL folder with random weights: the 7B config (or a tiny one) and the tiny tokenizer's ids."""
    import vlm
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    folder = Path(root) / ("planner-tiny" if tiny else "planner-7b-random")
    if (folder / "config.json").exists():
        return folder
    tok_dir = vlm.tiny_folder(Path(root) / "tokenizer", hidden=64, layers=1)  # its tokenizer and image processor
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tiny:
        config = json.loads((tok_dir / "config.json").read_text())
        config["text_config"].update(vocab_size=4096, hidden_size=128, intermediate_size=256)
        config["vision_config"]["out_hidden_size"] = 128
        config["text_config"]["rope_parameters"]["mrope_section"] = [4, 6, 6]
    else:
        config = json.loads((Path(__file__).parent / "configs" / "qwen2.5-vl-7b-instruct.json").read_text())
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [("image_token_id", "<|image_pad|>"), ("video_token_id",
           "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
           ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")]}
    config.update(ids, bos_token_id=None)
    t = time.time()
    with torch.device(device):  # random init where it is fast; saved in bf16 like the hub's weights
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(config),
                                                                dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    tok.save_pretrained(folder)
    for f in ("preprocessor_config.json", "chat_template.jinja"):
        if (tok_dir / f).exists():
            (folder / f).write_bytes((tok_dir / f).read_bytes())
    print(f"planner: random weights of {folder.name} built and saved in {time.time() - t:.0f}s")
    return folder


def check_planner(out, tiny, models, device):
    """Two GRPO steps of train.py on the gpu24 preset; returns memory.json (measured and planned per phase)."""
    import train
    folder = planner_folder(models, tiny, device)
    run = fresh(Path(out) / "planner")
    args = [f"--planner={folder}", f"--out_dir={run}", "--steps=2", "--sft_steps=0", "--eval_every=2",
            "--meter=heap"]  # a plan check: every tensor seen (free on a GPU)
    args += ["--preset=tiny_vl", "--grad_checkpointing=True", "--eval_n=4"] if tiny else \
        ["--preset=gpu24", "--eval_n=32"]
    t = time.time()
    train.main(train.parse_args(args), random_reward())
    mem = json.loads((run / "memory.json").read_text())
    mem["seconds"] = round(time.time() - t)
    return mem


def nf4_linears(module, dtype):
    """Replace every nn.Linear of `module` by a bitsandbytes NF4 Linear4bit holding the same weights (quantized on
    the module's device), as diffusers' bitsandbytes backend does for a FLUX transformer's blocks."""
    import bitsandbytes as bnb
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            device = child.weight.device
            setattr(module, name, q.to(device))
            del child
        else:
            nf4_linears(child, dtype)


@torch.no_grad()
def check_flux(out, tiny, steps, device, dtype, size=1024, text_tokens=512, sizes=None):
    """`steps` passes of the FLUX.1-Kontext transformer in NF4 over one Kontext edit; measured vs planned bytes.
    `sizes`: config fields to override (a smaller model of the same class)."""
    from diffusers import FluxTransformer2DModel

    from planner import no_avx512_repack
    config = json.loads((Path(__file__).parent / "configs" / "flux.1-kontext-dev-transformer.json").read_text())
    if tiny:
        config.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6])
        size, text_tokens = 128, 16
    config.update(sizes or {})
    gc.collect()  # the planner part's model is gone: its memory is not counted here
    if device == "cuda":
        torch.cuda.empty_cache()
    meter = memory.Meter(device, "heap")  # made before the weights, so they count (on a GPU, everything allocated does)
    t = time.time()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 12B model in fp32 first would need twice the memory
    try:
        with torch.device(device):
            model = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        nf4_linears(blocks, dtype)
    no_avx512_repack(model)  # on CPUs with AVX512-BF16 bitsandbytes would repack (and here break) the weights
    model.eval()
    print(f"flux: random weights built and quantized in {time.time() - t:.0f}s")
    n = (size // 16) ** 2  # latent tokens of one image: 8x VAE, then 2x2 patches
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 2 * n, config["in_channels"], device=device, dtype=dtype, generator=g)  # target + reference
    ids = torch.zeros(2 * n, 3, device=device)
    ids[n:, 0] = 1  # Kontext marks the reference image's tokens with a first coordinate of 1
    side = torch.arange(size // 16, device=device).float()
    ids[:, 1] = side.repeat_interleave(size // 16).repeat(2)
    ids[:, 2] = side.repeat(size // 16).repeat(2)
    text = torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype, generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype, generator=g)
    t = time.time()
    with meter.phase("edit"):
        for i in range(steps):
            model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.full((1,), 1 - i / steps, device=device, dtype=dtype),
                  img_ids=ids, txt_ids=torch.zeros(text_tokens, 3, device=device),
                  guidance=torch.full((1,), 2.5, device=device, dtype=dtype) if config["guidance_embeds"] else None)
    plan = memory.flux_plan(config, size, text_tokens, 2 if dtype in (torch.bfloat16, torch.float16) else 4)
    return {"device": device, "measured": {"edit": meter.peaks["edit"]}, "estimated": {"edit": sum(plan.values())},
            "parts": plan, "steps": steps, "seconds_per_step": round((time.time() - t) / steps, 2)}


def size(b):
    return f"{b / GB:.2f} GB" if b >= GB / 10 else f"{b / 2**20:.1f} MB"  # tiny configs measure megabytes


CUDA_CONTEXT = 0.5 * GB  # the CUDA context and kernels: in nvidia-smi, not in torch's counters


def against_plan(mem, limit=None):
    """(measured text, problems) of measured vs planned peaks per phase: each within 20%; and what must fit the card,
    the allocator's reserved peak (allocated + its cache and fragmentation; the allocated peak where there is no
    such counter) + the CUDA context, under `limit`."""
    err = {p: v / mem["estimated"][p] - 1 for p, v in mem["measured"].items() if p in mem["estimated"]}
    peak = max(mem.get("reserved", mem["measured"]).values()) + CUDA_CONTEXT
    problems = [f"{p} {e:+.0%} off the plan" for p, e in err.items() if abs(e) > 0.2]
    if limit and peak >= limit:
        problems.append(f"reserved peak + CUDA context {size(peak)} is not under {size(limit)}")
    text = ", ".join(f"{p} {size(v)} / {size(mem['estimated'][p])} ({err[p]:+.0%})"
                     for p, v in mem["measured"].items() if p in err) + " measured / planned"
    return text + (f"; reserved peak + context {size(peak)}" if limit else ""), problems


def run_planner(ctx):
    mem = check_planner(ctx.out, ctx.tiny, ctx.models, ctx.device)
    text, problems = against_plan(mem, 23.5 * GB)  # what a 24 GB card (24564 MiB) leaves to one process
    return {"measured": f"{mem['device']}: {text}", "problems": problems, "details": mem}


def run_flux(ctx):
    r = check_flux(ctx.out, ctx.tiny, 2 if ctx.tiny else ctx.flux_steps, ctx.device, ctx.dtype)
    text, problems = against_plan(r)
    return {"measured": f"{r['device']}: {text}, {r['seconds_per_step']}s/step", "problems": problems, "details": r}


# ----------------------------------------------------------------------------------------------------------------
# The registry, the runner and the table. Each check's `run` looks its function up when called (a test swaps one).

Check = namedtuple("Check", "run what bar plan")  # plan: the bar is the memory plan's (reported only with --tiny)
TRAIN_BAR = {"paper": "GRPO steps 1-3 with finite loss and a kept group each; evaluations at steps 2, 3",
             "outcome": "GRPO steps 1-3 with finite loss, every plan run by the agents; evaluations at 2, 3",
             "judge": "GRPO steps 1-3 with finite loss and a kept group each, every plan run and judged; evals at 2, 3"}
CHECKS = {
    **{f"{p}.{r}": Check(lambda ctx, p=p, r=r: check_train(ctx, p, r),
                         f"train.py --preset={p} --reward={r}: cold start, 2 GRPO steps, eval, resume to 3 "
                         + ("(seeded random reward)" if r == "paper" else "(scored: a plan, a tagless text)"),
                         TRAIN_BAR[r] + ", on the device", False) for p, r in TRAIN},
    **{f"edit.{e}": Check(lambda ctx, e=e: check_edit(ctx, e),
                          f"edit.py --preset=tiny_vl --editor={e}: a tiny random {e} pipeline edits a region",
                          "output at the input's size, the step ran, on the device", False) for e in EDITORS},
    "page": Check(lambda ctx: check_page(ctx), "app.py's page on tiny_vl with a tiny random kontext editor: two "
                  "requests, as gpu24 runs them", "both edited at the input's size, the planner freed before the "
                  "editor ran and not kept, the editor on the device", False),
    "planner": Check(lambda ctx: run_planner(ctx), "train.py --preset=gpu24: Qwen2.5-VL-7B (random) in NF4 + LoRA, "
                     "2 GRPO steps, 32-prompt evals", "each phase within 20% of the plan; reserved peak + 0.5 GB context "
                     "< 23.5 GB", True),
    "flux": Check(lambda ctx: run_flux(ctx), "FLUX.1-Kontext transformer (random) in NF4: one 1024 px edit",
                  "peak within 20% of the plan", True),
    "ranks": Check(lambda ctx: check_ranks(ctx), "torchrun --nproc_per_node=2 train.py --preset=tiny (NCCL; gloo "
                   "with --tiny) against one process", "the same adapter within 1e-4; skipped with fewer than 2 GPUs",
                   False),
}


def select(only):
    """The check names `--only` asks for: exact names, or a family (the part before the dot: tiny_vl, edit)."""
    if not only:
        return list(CHECKS)
    asked = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in asked if not any(n == x or n.startswith(x + ".") for n in CHECKS)]
    if unknown:
        raise SystemExit(f"error: no check called {', '.join(map(repr, unknown))}; the checks: {', '.join(CHECKS)} "
                         f"(or a family: {', '.join(sorted({n.split('.')[0] for n in CHECKS if '.' in n}))})")
    return [n for n in CHECKS if any(n == x or n.startswith(x + ".") for x in asked)]


def run_check(name, ctx):
    """Run one check; whatever it raises becomes its FAIL row, and the memory it held is freed for the next one."""
    check, t = CHECKS[name], time.time()
    print(f"\n=== {name}: {check.what}", flush=True)
    row = {"what": check.what, "bar": check.bar}
    try:
        r = check.run(ctx)
        applied = not (ctx.tiny and check.plan)
        row.update(r, result=("FAIL" if r["problems"] else "PASS") if applied else "INFO")
        if r.get("skipped"):
            row.update(result="SKIP", measured=f"skipped: {r['skipped']}")
    except (Exception, SystemExit) as e:  # SystemExit: train.py and edit.py stop with sys.exit on what they refuse
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-6))
        row.update(result="FAIL", measured="", problems=[f"{type(e).__name__}: {e}"],
                   error={"type": type(e).__name__, "message": str(e), "traceback": tb[-4000:]})
        print(tb, file=sys.stderr)
    gc.collect()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    row["seconds"] = round(time.time() - t, 1)
    return row


def table(rows):
    print(f"\n{'check':<16} {'result':<6} {'time':>6}  measured")
    for name, r in rows.items():
        note = "; ".join(r["problems"])
        if r["result"] == "INFO":
            note = "bar not applied (--tiny: the plan is for the GPU)" + (f": {note}" if note else "")
        print(f"{name:<16} {r['result']:<6} {r['seconds']:>5.0f}s  {r['measured']}" + (f"  [{note}]" if note else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="list the checks (name, what, bar) and stop; loads nothing")
    ap.add_argument("--only", default="", help="comma-separated check names or families (see --dry)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs for planner and flux, for the CPU")
    ap.add_argument("--flux_steps", type=int, default=28, help="denoising passes (memory is the same for each)")
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--ranks_run", default="", help=argparse.SUPPRESS)  # the ranks check's torchrun target
    args = ap.parse_args(argv)
    if args.ranks_run:
        import train
        return train.main(train.parse_args(RANKS_ARGS + [f"--out_dir={args.ranks_run}"]), lower_share)
    names = select(args.only)
    if args.dry:
        print(f"{len(names)} checks (with --tiny, planner and flux run tiny configs and their bars are reported only):")
        for n in names:
            print(f"{n:<16} {CHECKS[n].what}\n{'':<16} bar: {CHECKS[n].bar}")
        return {"checks": names}
    device, dtype, why = memory.pick_device()
    if not args.tiny and device != "cuda":
        sys.exit("error: gpu_check.py needs a CUDA GPU (the real 7B and 12B architectures); --tiny runs the same "
                 "code on tiny configs on the CPU, --dry lists the checks")
    print(f"device: {device} {str(dtype).replace('torch.', '')} ({why})" + (
        f", {torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB" if device == "cuda" else ""))
    ctx = argparse.Namespace(out=Path(args.out), tiny=args.tiny, device=device, dtype=dtype, flux_steps=args.flux_steps,
                             models=Path(os.environ.get("GPU_CHECK_DIR") or Path(tempfile.gettempdir()) / "gpu_check"))
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0, rows, path = time.time(), {}, ctx.out / "gpu_check.json"
    for n in names:
        rows[n] = run_check(n, ctx)
        failed = [n for n, r in rows.items() if r["result"] == "FAIL"]
        results = {"device": device, "why": why, "tiny": args.tiny, "checks": rows, "failed": failed,
                   "seconds": round(time.time() - t0)}
        path.write_text(json.dumps(results, indent=1, default=str))  # after each check: a killed run keeps its rows
    table(rows)
    info, skip = (sum(r["result"] == x for r in rows.values()) for x in ("INFO", "SKIP"))
    print(f"{len(rows)} checks: {len(rows) - len(failed) - info - skip} passed, {len(failed)} failed"
          + (f", {info} reported only (--tiny)" if info else "") + (f", {skip} skipped" if skip else "")
          + f"; {results['seconds']}s; wrote {path}")
    if failed:
        print(f"FAILED: {', '.join(failed)} (tracebacks in {path})", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
