"""
Train the decomposition agent (the planner) with GRPO, on one machine.

    python train.py                          # the cpu preset: SmolLM2-135M in 4-bit + LoRA, on any machine
    python train.py --preset=tiny --steps=4  # a random tiny model, seconds
    python train.py --seed=1 --out_dir=runs/seed1 --resume=True   # any Config field as --key=value
    python train.py --help                   # every Config field with its default and what it does
    python train.py --train_dir=my_data/train --eval_dir=my_data/test     # your own metadata.jsonl folders
    python train.py --eval_adapter=runs/default/adapter                  # only score a saved adapter
    python train.py --preset=gpu24 --dry_run=True    # the memory plan of a config (memory.py); no GPU needed
    python train.py --preset=gpu24                   # Qwen2.5-VL-7B (sees the image) on one 24 GB GPU (vlm.py)
    python train.py --preset=tiny_vl --steps=2       # gpu24's code on a random tiny Qwen2.5-VL, on any machine

One run: score the base model zero-shot on the held-out split, a short supervised cold start (`sft_steps`, on at
most 10% of the train split, only so a small model learns the tag format), score again, then GRPO:

    for each step: B prompts -> G completions each (KV-cached sampler) -> rewards for all B*G in one call (the
    paper's format + F1, or with --reward=outcome|both the plans run by the agents and the edited images scored)
    -> advantages normalised within each group (groups with equal rewards carry no signal and are dropped)
    -> per-token clipped surrogate + beta * k3 KL to the reference -> backward in micro-batches -> clip -> step

What is simplified compared with the paper: one policy update per batch, so the ratio is exp(logp - logp.detach())
(1 in value, the policy gradient in its derivative) and the clip only matters for code that takes several updates;
the loss averages tokens per sequence, then sequences (the paper's GRPO form, not Dr.GRPO); the cpu planner cannot
see images, so its prompt carries the request and a one-line perception text of the image (`describe`, the same
line edit.py gives it). The reference is the same 4-bit model with the LoRA adapter
disabled, so no second copy of the weights; note that this is the base model *before* the cold start, which does not
write the tags at all, so the KL (about 1 nat per token from the first step) is a weak pull away from the format and
`beta` is kept small. The cold start's adapter is the one GRPO goes on training.
With a VLM planner (gpu24, tiny_vl) the prompt carries the image itself (vlm.prompts) instead of the perception
text, and `--reward=judge` scores each plan's edited image with the planner's base model (reward.judge_rewards).
Each phase's peak memory (vision or prompts, sample, update, eval, judge) is measured (memory.Meter) and written
to memory.json, next to the plan's estimate for a VLM planner.
The device and the planner's dtype are chosen once (memory.pick_device: `--device=auto|cuda|cpu`, bf16 on a GPU),
printed and passed down; rewards are made on the CPU and cross to the device at one line of the step.

Run folder (`out_dir`): config.json (with versions and git commit), metrics.jsonl, memory.json, reward.png,
adapter/ (peft), cold_start/ (the adapter after the cold start, before GRPO), state.pt (LoRA weights, optimizer,
scheduler, step, RNG). Checkpoints are written atomically every `save_every` steps and at the end;
`--resume=True` continues from the last one, with the run's settings: only those in checkpoint.RESUMABLE (steps,
lr, ...) may differ from config.json.
"""
import ast
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import memory
import reward
import rollout
import vlm
from agents import greedy_plans
from checkpoint import load_checkpoint, resumed_config, run_info, save_checkpoint, tidy_checkpoint
from data import DataError, grpo_batch, load_requests, sample_image
from plan import format_plan
from planner import cache_dir, load_planner
from regions import describe_requests


@dataclass
class Config:
    preset: str = "auto"                 # cpu | tiny | gpu24 | tiny_vl (see PRESETS); auto picks one for this machine
    device: str = "auto"                 # where the planner runs: auto (the CUDA GPU if any, else cpu), cuda, cpu
    quantize: bool = True                # the planner's base in NF4; False: in full precision (more memory)
    planner: str = ""                    # the VLM planner (gpu24, tiny_vl): a hub id or a local folder
    max_pixels: int = 448 * 448          # VLM planner: each image is resized to at most this many pixels
    image_size: int = 448                # VLM planner: built-in images are drawn at this many pixels a side
    dry_run: bool = False                # print the memory plan of this config (memory.py) and stop
    seed: int = 0                        # one seed for data, sampling and init
    out_dir: str = "runs/default"        # run folder: config.json, metrics.jsonl, adapter/, state.pt
    resume: bool = False                 # continue from out_dir/state.pt
    eval_adapter: str = ""               # only score this saved adapter folder on the held-out split, no training
    # planner and LoRA
    lora_r: int = 16                     # LoRA rank
    lora_alpha: int = 32                 # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0            # dropout inside LoRA (0 keeps rollouts and updates consistent)
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names that get adapters
    # data (built-in synthetic requests unless a dataset folder is given)
    train_dir: str = ""                  # a metadata.jsonl folder with labels to train on instead
    eval_dir: str = ""                   # a metadata.jsonl folder with labels for the held-out scores instead
    train_n: int = 2000                  # train requests used (the RL prompts; first train_n of a folder)
    describe: bool = True                # prompts carry the perception text of the request's image (edit.py does)
    # supervised cold start (format only)
    sft_n: int = 100                     # labelled requests for the cold start, at most 10% of train_n
    sft_steps: int = 20                  # optimizer steps of the cold start (0: none)
    sft_batch: int = 8                   # requests per cold-start step
    sft_lr: float = 3e-4                 # cold-start learning rate
    # GRPO
    steps: int = 25                      # GRPO steps
    batch_prompts: int = 4               # B prompts per step
    group_size: int = 8                  # G completions per prompt
    max_new_tokens: int = 48             # plans are short; longer completions are cut
    constrain: bool = True               # decode plans with rollout.PlanGrammar: only actions and goals the CPU
                                         # editor reads (rollouts, evaluation and edit.py alike)
    temperature: float = 0.8             # sampling temperature of rollouts (evaluation is greedy)
    top_p: float = 1.0                   # nucleus sampling of rollouts
    lr: float = 3e-4                     # GRPO learning rate (the paper's 1e-6 is for full 7B weights, not LoRA)
    warmup: int = 3                      # linear warm-up steps, then cosine decay to 10%
    beta: float = 0.02                   # weight of the k3 KL penalty to the reference
    clip: float = 0.2                    # PPO clip range of the ratio
    micro_groups: int = 4                # groups per backward pass (gradient accumulation over the rest)
    grad_clip: float = 1.0               # max gradient norm
    grad_checkpointing: bool = False     # recompute activations in backward (saves memory on long sequences)
    max_bad_steps: int = 3               # stop after this many non-finite losses in a row
    # reward: "paper" (format + F1, never looks at the image), "outcome" (run the plan, score the edited image),
    # "both" (outcome_mix * outcome + (1 - outcome_mix) * paper), "judge" (run the plan, the VLM planner's base
    # scores the edit 0-10: completion, quality, preservation; VLM presets only); see reward.py
    reward: str = "paper"
    outcome_weights: tuple = (0.6, 0.3, 0.1)  # target similarity, preservation outside gold regions, BRISQUE
    outcome_mix: float = 0.5             # weight of the outcome part when reward="both"
    outcome_size: int = 256              # images are edited and scored at this many pixels a side
    reward_tol: float = 1e-3             # a group whose rewards span no more than this carries no signal
    # evaluation and saving
    eval_n: int = 100                    # held-out requests scored per evaluation
    eval_batch: int = 25                 # prompts decoded together during evaluation
    eval_every: int = 25                 # GRPO steps between evaluations (and at the end)
    eval_judge: bool = False             # also score the held-out plans' edits with the local judge (VLM presets)
    save_every: int = 10                 # GRPO steps between checkpoints (and at the end)


PRESETS = {
    "cpu": {},
    "tiny": dict(lora_r=4, lora_alpha=8, train_n=40, sft_n=4, sft_steps=2, sft_batch=2, steps=4, batch_prompts=2,
                 group_size=4, max_new_tokens=12, eval_n=4, eval_batch=4, eval_every=2, save_every=2, lr=1e-2,
                 describe=False, constrain=False),
    # The paper's planner, which sees the image (so no perception text); diffusers editors read free text.
    "gpu24": dict(planner="Qwen/Qwen2.5-VL-7B-Instruct", lora_r=64, lora_alpha=128, max_new_tokens=128,
                  batch_prompts=8, micro_groups=2, eval_batch=32, grad_checkpointing=True, constrain=False,
                  describe=False),
    # gpu24's code path (Qwen2.5-VL class, images in the prompt) on a random tiny model, on any machine: tests.
    "tiny_vl": dict(planner="", lora_r=4, lora_alpha=8, train_n=40, sft_n=4, sft_steps=2, sft_batch=2, steps=4,
                    batch_prompts=2, group_size=4, max_new_tokens=12, eval_n=4, eval_batch=4, eval_every=2,
                    save_every=2, lr=1e-2, describe=False, constrain=False, max_pixels=112 * 112, image_size=112),
}
VLM_PRESETS = ("gpu24", "tiny_vl")


# ----------------------------------------------------------------------------------------------------------------
# The RL math: small pure functions on tensors.

def group_advantages(rewards, tol=1e-3, eps=1e-4):
    """rewards (B, G) -> (advantages (B, G), signal (B,) bool), normalised within each group. A group whose rewards
    span no more than `tol` has no signal and gets zeros: the same plan scored twice by a bf16 judge differs in the
    last bits, and normalising that noise would make it +-1 advantages."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)       # (B, 1)
    signal = rewards.max(1).values - rewards.min(1).values > tol                  # (B,)
    return torch.where(signal[:, None], (rewards - mean) / (std + eps), torch.zeros_like(rewards)), signal


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip=0.2, beta=0.0):
    """Per-token clipped surrogate plus beta * k3 KL to the reference, masked mean per sequence, then mean.
    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,). Returns (loss, mean KL per token)."""
    ratio = torch.exp(logp - old_logp)                                            # (N, T)
    adv = advantages[:, None]                                                     # (N, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)     # (N, T)
    # k3 estimator of KL(policy || ref), >= 0; the log-ratio is clamped so that one token the reference finds
    # nearly impossible (a forced one) cannot make it inf
    log_ratio = (ref_logp - logp).clamp(-20, 20)                                  # (N, T)
    kl = torch.exp(log_ratio) - log_ratio - 1                                     # (N, T)
    per_token = -(surrogate - beta * kl) * mask
    tokens = mask.sum(1).clamp(min=1)                                             # (N,)
    loss = (per_token.sum(1) / tokens).mean()
    return loss, ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()


def lr_factor(step, warmup, total):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def detect_preset():
    """The preset for this machine and why: gpu24 on a CUDA GPU with at least 20 GB where its planner can be loaded
    (a local copy, or the hub reachable), anything else cpu."""
    if not torch.cuda.is_available():
        return "cpu", "no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    gb = props.total_memory / 2**30
    if gb < 20:
        return "cpu", f"{props.name} has {gb:.0f} GB, gpu24 needs 20"
    ok, why = vlm.available(PRESETS["gpu24"]["planner"])
    if not ok:
        return "cpu", (f"{props.name} has {gb:.0f} GB, but {why}; `huggingface-cli download "
                       f"{PRESETS['gpu24']['planner']}` makes gpu24 the default")
    return "gpu24", f"{props.name} has {gb:.0f} GB and {why}"


def parse_args(argv):
    """--key=value overrides on top of a preset. Values are Python literals, else strings. Unknown keys, wrong
    types and values out of range are errors that name the key; -h or --help prints the fields and exits."""
    if "-h" in argv or "--help" in argv:
        print(usage())
        raise SystemExit(0)
    kv = {}
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"error: arguments are --key=value (or --help), got {a!r}")
        k, v = a[2:].split("=", 1)
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass  # a plain string
        kv[k] = v
    preset = kv.get("preset", Config.preset)
    if preset == "auto":
        preset, why = detect_preset()
        print(f"preset: {preset} ({why})")
        kv.pop("preset", None)
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg, types = Config(), {f.name: f.type for f in fields(Config)}
    for k, v in {**PRESETS[preset], **kv}.items():
        if k not in types:
            raise SystemExit(f"error: unknown config key {k!r}")
        want = types[k]
        if want is float and type(v) is int:
            v = float(v)
        if want is tuple and isinstance(v, list):
            v = tuple(v)
        if type(v) is not want:
            raise SystemExit(f"error: config key {k!r} wants {want.__name__}, got {v!r}")
        setattr(cfg, k, v)
        if k in kv:
            print(f"override: {k} = {v!r}")
    cfg.preset = preset
    if preset == "gpu24" and not cfg.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: the gpu24 preset needs a CUDA GPU with about 24 GB, and this machine has none. "
                         "Use --preset=cpu (the default here), --preset=tiny_vl to run gpu24's code on a tiny "
                         "random model, or --preset=gpu24 --dry_run=True to see its memory plan")
    validate(cfg)
    return cfg


def usage():
    """The text of --help: the commands of the docstring, then every Config field with its default and comment,
    read from Config's source so that the comments stay the one place where a field is explained."""
    import inspect
    import io
    import tokenize
    src = inspect.getsource(Config)
    names = {n.lineno: n.target.id for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)}
    notes = {t.start[0]: (t.start[1], t.string.lstrip("#").strip())
             for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    indent = min(col for row, (col, _) in notes.items() if row not in names)  # a section comment's column
    defaults, width = asdict(Config()), 40
    lines = ["usage: python train.py [--key=value ...]   (values are Python literals, else strings)\n",
             __doc__.strip().split("\n\n")[1],
             f"\npresets (--preset=..., each overrides some defaults below; see PRESETS): {', '.join(PRESETS)}"]
    heading = False
    for row in range(1, len(src.splitlines()) + 1):
        col, note = notes.get(row, (0, ""))
        if row in names:
            v = defaults[names[row]]
            flag = f"  --{names[row]}={v if isinstance(v, str) else repr(v)}"
            lines.append(f"{flag.ljust(width)} {note}".rstrip())
        elif note and col > indent:  # a comment that goes on from the field above
            lines.append(" " * width + f" {note}")
        elif note:  # a section heading, maybe of several lines
            lines.append(("" if heading else "\n") + f"# {note}")
        heading = bool(note) and row not in names and col <= indent
    return "\n".join(lines)


def validate(cfg):
    """Every field's range, checked before anything loads or is written: a bad value must not cost a model load,
    nor leave a run folder that refuses the corrected command. Each error names the field, its value and the range."""
    def need(key, ok, allowed):
        if not ok:
            raise SystemExit(f"error: {key}={getattr(cfg, key)!r} is out of range; allowed: {allowed}")

    def number(v):
        return type(v) in (int, float) and math.isfinite(v)

    for k in ("lora_r", "lora_alpha", "train_n", "sft_batch", "steps", "batch_prompts", "max_new_tokens",
              "micro_groups", "max_bad_steps", "eval_n", "eval_batch", "eval_every", "save_every"):
        need(k, getattr(cfg, k) >= 1, "an int >= 1")
    for k in ("seed", "sft_n", "sft_steps", "warmup"):
        need(k, getattr(cfg, k) >= 0, "an int >= 0")
    for k in ("lr", "sft_lr", "temperature", "clip", "grad_clip"):
        need(k, number(getattr(cfg, k)) and getattr(cfg, k) > 0, "a finite number > 0")
    for k in ("beta", "reward_tol"):
        need(k, number(getattr(cfg, k)) and getattr(cfg, k) >= 0, "a finite number >= 0")
    need("group_size", cfg.group_size >= 2, "an int >= 2 (GRPO compares the completions of a prompt with each "
                                            "other; a group of one never has a signal)")
    need("top_p", 0 < cfg.top_p <= 1, "a number in (0, 1]")
    need("lora_dropout", 0 <= cfg.lora_dropout < 1, "a number in [0, 1)")
    need("outcome_mix", 0 <= cfg.outcome_mix <= 1, "a number in [0, 1]")
    need("outcome_weights", len(cfg.outcome_weights) == 3 and all(number(w) and w >= 0 for w in cfg.outcome_weights)
         and sum(cfg.outcome_weights) > 0, "3 weights >= 0, not all 0 (target, preserve, quality)")
    need("outcome_size", cfg.outcome_size >= 32, "an int >= 32 (pixels a side)")
    need("max_pixels", cfg.max_pixels >= 28 * 28, "an int >= 784 (Qwen2.5-VL's images are cut in 28 x 28 blocks)")
    need("image_size", cfg.image_size >= 28, "an int >= 28 (Qwen2.5-VL's images are cut in 28 x 28 blocks)")
    need("lora_targets", cfg.lora_targets and all(isinstance(t, str) and t for t in cfg.lora_targets),
         "a non-empty tuple of module names, e.g. ('q_proj', 'v_proj')")
    need("out_dir", cfg.out_dir.strip(), "a folder")
    need("preset", cfg.preset in PRESETS, ", ".join(PRESETS))
    need("planner", not cfg.planner or cfg.preset in VLM_PRESETS, f"'' with preset {cfg.preset} (only the VLM "
                                                                   f"presets {', '.join(VLM_PRESETS)} read it)")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except RuntimeError:
            need("device", False, "auto, cpu, cuda or cuda:N")
    need("reward", cfg.reward in ("paper", "outcome", "both", "judge"), "paper, outcome, both or judge")
    if (cfg.reward == "judge" or cfg.eval_judge) and cfg.preset not in VLM_PRESETS:
        raise SystemExit(f"error: reward=judge and eval_judge need a VLM planner (preset gpu24 or tiny_vl), not "
                         f"{cfg.preset}: the judge is the planner's own base model, looking at the images")
    need("sft_n", cfg.sft_n <= cfg.train_n // 10, f"at most 10% of train_n={cfg.train_n}, {cfg.train_n // 10} (the "
                                                  "cold start only teaches the format, the RL must do the rest)")
    need("sft_n", cfg.sft_n >= 1 or not cfg.sft_steps, f">= 1 with sft_steps={cfg.sft_steps} (or sft_steps=0: no "
                                                        "cold start)")


def evaluate(planner, samples, cfg):
    """Greedy plans for held-out samples, scored with the paper's reward. Returns mean format-valid rate, F1 per
    field, mean F1 and mean reward, plus the completions."""
    grammar = rollout.plan_grammar(planner.tok) if cfg.constrain else None
    texts = greedy_plans(planner, [s["instruction"] for s in samples], cfg.max_new_tokens, cfg.eval_batch,
                         [s.get("description") for s in samples], grammar,
                         [sample_image(s, cfg.image_size) for s in samples] if planner.processor else None)
    rewards, info = reward.paper_rewards(texts, samples)
    out = {k: round(v.mean().item(), 4) for k, v in info.items()}
    out["reward"] = round(rewards.mean().item(), 4)
    if cfg.eval_judge:  # the paper's three criteria, 0-10, from the local judge; NaN when no plan ran
        _, judged = reward.judge_rewards(planner, reward.Outcome(cfg.outcome_size, quality=False), texts, samples)
        out.update({f"judge_{k}": round(judged[k].nanmean().item(), 3)
                    for k in ("completion", "quality", "preservation")})
    return out, texts


def score(cfg, planner, outcome, meter, texts, golds):
    """Rewards (N,) of N completions, on the CPU, with the paper's parts (`info`: format and F1s, always logged)
    and `extra` log fields of the outcome or judge reward. A plan that fails to run gets 0 and is counted."""
    rewards, info = reward.paper_rewards(texts, golds)
    if cfg.reward == "paper":
        return rewards, info, {}
    t = time.time()
    extra = {"paper_reward": round(rewards.mean().item(), 4)}
    if cfg.reward == "judge":  # the base model, adapter off, scores each plan's edited image
        with meter.phase("judge"):
            judged, parts = reward.judge_rewards(planner, outcome, texts, golds)
        rewards = judged
    else:
        runs = dict(outcome.counts)
        out_r, parts = outcome(texts, golds)
        extra.update({"failed_samples": int(parts["failed"].sum()),
                      **{k: outcome.counts[k] - runs.get(k, 0) for k in ("agent_errors", "steps_run", "steps_reused")}})
        rewards = out_r if cfg.reward == "outcome" else cfg.outcome_mix * out_r + (1 - cfg.outcome_mix) * rewards
    extra.update({k: round(v.nanmean().item(), 4) for k, v in parts.items() if not v.isnan().all()},
                 outcome_seconds=round(time.time() - t, 2))
    return rewards, info, extra


def make_prompts(planner, samples, cfg):
    """The prompts of labelled requests: token ids, and for a VLM planner the Vision of their images (else None)."""
    if planner.processor is None:
        return [rollout.build_prompt(planner.tok, s["instruction"], s.get("description")) for s in samples], None
    return vlm.prompts(planner, [s["instruction"] for s in samples],
                       [sample_image(s, cfg.image_size) for s in samples])


def load_policy(cfg, device, dtype, adapter=None):
    """The planner of cfg's preset in NF4 (or full precision: quantize=False) + LoRA on `lora_targets` (a fresh
    adapter, or the saved one in `adapter`), on `device`."""
    lora = dict(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, adapter=adapter,
                lora_targets=cfg.lora_targets, device=device, dtype=dtype)
    if cfg.preset not in VLM_PRESETS:  # unquantized: the NF4 numbers stored in full precision
        return load_planner(cfg.preset, dequantized=not cfg.quantize, **lora)
    name = cfg.planner or str(vlm.tiny_folder(cache_dir() / "tiny-qwen2.5-vl"))
    return vlm.load(name, max_pixels=cfg.max_pixels, quantize=cfg.quantize, **lora)


def sft(planner, samples, cfg):
    """Supervised cold start: teacher-forced log-likelihood of the gold plan (and the end-of-turn token)."""
    tok, policy = planner.tok, planner.policy
    end, rng = tok.convert_tokens_to_ids("<|im_end|>"), random.Random(cfg.seed)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.sft_lr)
    policy.train()
    for step in range(cfg.sft_steps):
        batch = rng.sample(samples, min(cfg.sft_batch, len(samples)))
        prompts, vision = make_prompts(planner, batch, cfg)
        targets = [tok(format_plan(s["action"], s["subject"], s["goal"]), add_special_tokens=False)["input_ids"]
                   + [end] for s in batch]
        T = max(len(t) for t in targets)
        ids = torch.tensor([t + [tok.pad_token_id] * (T - len(t)) for t in targets], device=policy.device)
        mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in targets], device=policy.device)
        loss = -rollout.completion_logp(policy, prompts, ids, mask, tok.pad_token_id, vision=vision).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"sft {step + 1}/{cfg.sft_steps} | loss {loss.item():.3f}")


def plot(out, history):
    """reward.png: train reward per step and held-out reward per evaluation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib, no plot (pip install matplotlib)")
        return
    train = [(h["step"], h["reward"]) for h in history if h["phase"] == "grpo"]
    evals = [(h["step"], h["reward"]) for h in history if h["phase"].startswith("eval")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train (sampled)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward (train: the run's; held-out: paper's)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward.png", dpi=100)
    plt.close(fig)


def check_run(cfg, out):
    """Everything that can be refused, checked before the planner loads and before the run folder is touched: the
    data (both splits, labels included), the run folder's state, a resume's settings. Returns (train, test, the
    config.json to write)."""
    test = load_requests(cfg.eval_dir, "test", cfg.eval_n, seed=0)  # the same whatever the seed, so seeds compare
    train = load_requests(cfg.train_dir, "train", cfg.train_n, seed=cfg.seed, at_least=cfg.batch_prompts)
    if cfg.resume and not (out / "state.pt").exists():
        raise SystemExit(f"error: --resume=True but {out / 'state.pt'} does not exist")
    if not cfg.resume and (out / "state.pt").exists():
        raise SystemExit(f"error: {out} already holds a run; pass --resume=True or choose another --out_dir")
    config = resumed_config(out, cfg) if cfg.resume else {**asdict(cfg), **run_info()}
    return train, test, config


def log(out, history, row):
    history.append(row)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def heldout(planner, test, cfg, meter, out, history, phase, step):
    """Score the held-out split greedily, print one line and log it."""
    t = time.time()
    with meter.phase("eval"):
        scores, texts = evaluate(planner, test, cfg)
    print(f"{phase} (step {step}, {len(test)} held-out, {time.time() - t:.0f}s): " +
          " ".join(f"{k}={v:.3f}" for k, v in scores.items()) + f"\n  e.g. {texts[0]!r}")
    log(out, history, {"phase": phase, "step": step, **scores})


def optimizer(params, device, cfg):
    """AdamW (paged 8-bit on a GPU: state in 8 bits, paged out under memory pressure), and the lr schedule."""
    if torch.device(device).type == "cuda":
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps))


def resume(out, policy, opt, sched, cfg):
    """Load the last checkpoint; returns (its step, the logged rows up to it: later ones are done again)."""
    start = load_checkpoint(out, policy, opt, sched)
    # lr, warmup and steps may differ from the saved run's (RESUMABLE): the saved optimizer and scheduler would
    # silently keep the old lr, so the schedule goes on from the saved step with the new ones
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for g in opt.param_groups:
        g["initial_lr"], g["lr"] = cfg.lr, cfg.lr * lr_factor(sched.last_epoch, cfg.warmup, cfg.steps)
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    history = [r for r in rows if r["step"] <= start]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
    print(f"resumed from {out / 'state.pt'} at step {start}")
    return start, history


def grpo_update(policy, params, opt, roll, prompts, vision, adv, keep, pad, cfg):
    """One policy update on the kept groups: micro-batches of `micro_groups` groups, each with its reference pass
    (the adapter off) and loss, gradients accumulated, clipped, and one optimizer step unless the loss or the
    gradient norm is not finite (bf16 overflow: one such step would poison the LoRA weights and the optimizer's
    moments for good). Returns (mean loss, mean KL, gradient norm, finite)."""
    G, loss_sum, kl_sum = cfg.group_size, 0.0, 0.0
    for i in range(0, len(keep), cfg.micro_groups):
        gs = keep[i:i + cfg.micro_groups]
        rows = torch.tensor([b * G + g for b in gs for g in range(G)], device=roll.ids.device)
        ids, mask = roll.ids[rows], roll.mask[rows]
        sub, vis = [prompts[b] for b in gs], vision and vision.subset(gs)
        with torch.no_grad(), policy.disable_adapter():
            ref_logp = rollout.completion_logp(policy, sub, ids, mask, pad, G, vis, cfg.temperature)
        logp = rollout.completion_logp(policy, sub, ids, mask, pad, G, vis, cfg.temperature)
        loss, kl = grpo_loss(logp, logp.detach(), ref_logp, adv.view(-1)[rows], mask, cfg.clip, cfg.beta)
        (loss * len(gs) / len(keep)).backward()
        loss_sum, kl_sum = loss_sum + loss.item() * len(gs), kl_sum + kl.item() * len(gs)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item() if keep else 0.0
    finite = math.isfinite(loss_sum) and math.isfinite(norm)
    if keep and finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    n = max(len(keep), 1)
    return loss_sum / n, kl_sum / n, norm, finite


def print_table(history, n):
    """The held-out table of a run: one row per stage (zero-shot, cold start, after GRPO)."""
    names = {"eval zero-shot": "base, zero-shot", "eval cold start": "after cold start"}
    table = {names.get(h["phase"], "after GRPO"): h for h in history if h["phase"].startswith("eval")}
    print(f"\nheld-out split ({n} requests), greedy decoding:")
    print(f"{'':>18} {'format':>7} {'F1 act':>7} {'F1 subj':>7} {'F1 goal':>7} {'F1 mean':>7} {'reward':>7}")
    for name, h in table.items():
        print(f"{name:>18} " + " ".join(f"{h[k]:7.3f}" for k in
                                        ("format", "f1_action", "f1_subject", "f1_goal", "f1", "reward")))


def main(cfg):
    """By cfg: the memory plan (dry_run), the held-out scores of a saved adapter (eval_adapter), or a training run."""
    validate(cfg)  # parse_args did too; a Config built in code is checked here
    if cfg.dry_run:
        return memory.show(cfg)
    device, dtype, why = memory.pick_device(cfg.device)  # chosen here once; everything below is given them
    print(f"device: {device} ({why}), planner compute dtype {str(dtype).removeprefix('torch.')}")
    if not cfg.eval_adapter:
        return train(cfg, device, dtype)
    if not (Path(cfg.eval_adapter) / "adapter_config.json").exists():
        raise SystemExit(f"error: {cfg.eval_adapter} is not an adapter folder (no adapter_config.json)")
    test = load_requests(cfg.eval_dir, "test", cfg.eval_n, seed=0)
    if cfg.describe:
        describe_requests(test)
    scores, _ = evaluate(load_policy(cfg, device, dtype, cfg.eval_adapter), test, cfg)
    print(f"{cfg.eval_adapter} on {len(test)} held-out requests: "
          + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return scores


def train(cfg, device, dtype):
    """A run: checks, the planner, zero-shot and cold-start evaluations (or a resume), then the GRPO loop. Returns
    the logged rows."""
    from tqdm import tqdm
    out = Path(cfg.out_dir)
    train_set, test, config = check_run(cfg, out)
    if cfg.describe:
        t0 = time.time()
        describe_requests(test + train_set)
        print(f"perception text for {len({s.get('image_path') or s['image'] for s in train_set})} train images in "
              f"{time.time() - t0:.0f}s, e.g. {train_set[0]['description']!r}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        tidy_checkpoint(out)
    elif (out / "metrics.jsonl").exists():  # a run killed before its first checkpoint: its rows are not this run's
        (out / "metrics.jsonl").unlink()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(cfg.seed)
    import bitsandbytes  # noqa: F401  imported before the meter starts: library code is not model memory
    import peft  # noqa: F401
    meter, t0 = memory.Meter(device), time.time()
    planner = load_policy(cfg, device, dtype)
    policy, tok = planner.policy, planner.tok
    print(f"planner: {cfg.preset} in {'NF4' if cfg.quantize else 'full precision'} + LoRA r={cfg.lora_r}, "
          f"loaded in {time.time() - t0:.1f}s")
    if cfg.grad_checkpointing:
        planner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        planner.model.enable_input_require_grads()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt, sched = optimizer(params, device, cfg)
    evaluate_now = lambda phase, step: heldout(planner, test, cfg, meter, out, history, phase, step)  # noqa: E731
    if cfg.resume:
        start, history = resume(out, policy, opt, sched, cfg)
    else:
        start, history = 0, []
        evaluate_now("eval zero-shot", 0)
        if cfg.sft_steps:
            sft(planner, train_set[:cfg.sft_n], cfg)
            evaluate_now("eval cold start", 0)
            policy.save_pretrained(out / "cold_start")  # the untrained pipeline's planner, for eval.py
        save_checkpoint(out, policy, opt, sched, 0)

    stop, pad, bad = rollout.stop_ids(tok, planner.model), tok.pad_token_id, 0
    grammar = rollout.plan_grammar(tok) if cfg.constrain else None
    outcome = reward.Outcome(cfg.outcome_size, cfg.outcome_weights) if cfg.reward != "paper" else None
    B, G, longest = cfg.batch_prompts, cfg.group_size, 0
    for step in tqdm(range(start, cfg.steps), desc="grpo", initial=start, total=cfg.steps, disable=None):
        t = time.time()
        # sample: B prompts, G completions each; prompts and tokens are fixed by (seed, step), so runs replay
        batch = grpo_batch(train_set, cfg.seed, step, B)
        policy.eval()
        with meter.phase("vision" if planner.processor else "prompts"):
            prompts, vision = make_prompts(planner, batch, cfg)
        longest = max(longest, *map(len, prompts))
        gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
        with meter.phase("sample"):
            roll = rollout.sample_group(policy, prompts, G, cfg.max_new_tokens, stop, pad, cfg.temperature,
                                        cfg.top_p, gen, grammar=grammar, vision=vision)
        t_sample = time.time() - t
        # score all B*G completions in one call (on the CPU), then the one place they move to the policy's device
        texts, golds = rollout.decode(tok, roll), [s for s in batch for _ in range(G)]
        rewards, info, extra = score(cfg, planner, outcome, meter, texts, golds)
        rewards = rewards.to(device)
        adv, signal = group_advantages(rewards.view(B, G), cfg.reward_tol)          # (B, G), (B,)
        keep = signal.nonzero().flatten().tolist()                                  # groups with signal
        policy.train()
        with meter.phase("update"):
            loss, kl, norm, finite = grpo_update(policy, params, opt, roll, prompts, vision, adv, keep, pad, cfg)
        sched.step()  # the schedule follows the step number, skipped or not
        if not finite:
            bad += 1
            what = "loss" if not math.isfinite(loss) else f"gradient norm ({norm})"
            print(f"step {step + 1}: non-finite {what}, step skipped ({bad} in a row)")
            if bad >= cfg.max_bad_steps:
                raise SystemExit(f"error: non-finite {what} {bad} steps in a row; lower lr (now {cfg.lr}) "
                                 f"or check the data. Last checkpoint: {out / 'state.pt'}")
            continue
        bad = 0
        row = {"phase": "grpo", "step": step + 1, "reward": round(rewards.mean().item(), 4),
               "format": round(info["format"].mean().item(), 4), "f1": round(info["f1"].mean().item(), 4),
               "loss": round(loss, 5), "kl": round(kl, 5), "grad_norm": round(norm, 4),
               "kept_groups": len(keep), "dropped_groups": B - len(keep), "lr": sched.get_last_lr()[0],
               "tokens": int(roll.mask.sum()), **extra, "sample_seconds": round(t_sample, 2),
               "peak_gb": round(max(meter.peaks.values()) / 2**30, 3), "seconds": round(time.time() - t, 2)}
        log(out, history, row)
        tqdm.write(f"step {step + 1}/{cfg.steps} | reward {row['reward']:.3f} fmt {row['format']:.2f} "
                   f"f1 {row['f1']:.3f} | groups {len(keep)}/{B} | loss {row['loss']:+.4f} kl {row['kl']:.4f} "
                   f"| gnorm {norm:.3f} lr {row['lr']:.1e} | {row['seconds']:.1f}s")
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            evaluate_now("eval", step + 1)
        if (step + 1) % cfg.save_every == 0 or last:
            save_checkpoint(out, policy, opt, sched, step + 1)
            plot(out, history)
    memory.report(meter, cfg, planner, out, longest)
    print_table(history, len(test))
    return history


if __name__ == "__main__":
    try:
        main(parse_args(sys.argv[1:]))
    except DataError as e:  # bad dataset input: the message says what and where; no traceback needed
        sys.exit(f"error: {e}")
