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
most 10% of the train split: the tag format and a first reading of requests), score again, then GRPO (a text
planner samples its rollouts and decodes its evaluations from a merged copy, engine.py):

    for each step: B prompts -> G completions each (KV-cached sampler) -> rewards for all B*G in one call (the
    paper's format + F1, --reward=edits F1 over whole edits, or with --reward=outcome|both the plans run by the
    agents and the edited images scored) -> advantages normalised within each group (groups with equal rewards
    carry no signal: dynamic sampling draws fresh prompts for them, up to `resample` rounds) -> per-token clipped
    surrogate (+ beta * k3 KL to the reference, off by default) -> backward in micro-batches -> clip -> step

What is simplified compared with the paper: one policy update per batch, so the ratio is exp(logp - logp.detach())
(1 in value, the policy gradient in its derivative) and the clip only matters for code that takes several updates;
the loss averages tokens per sequence, then sequences (the paper's GRPO form, not Dr.GRPO); the cpu planner cannot
see images, so its prompt carries the request and a one-line perception text of the image (`describe`, the same line
edit.py gives it). No KL term by default (`beta=0`, as in DAPO): the reference would be the same 4-bit model with
the LoRA adapter disabled (no second copy of the weights), which is the base model *before* the cold start; it does
not write the tags at all, so its KL (1-3 nats per token from the first step, spikes of 8-20) pulls away from what
the cold start taught, and its pass costs a forward of every completion. The cold start's adapter is the one GRPO
goes on training.
With a VLM planner (gpu24, tiny_vl) the prompt carries the image itself (vlm.prompts) instead of the perception
text, and `--reward=judge` scores each plan's edited image with the planner's base model (reward.Judge).
Each phase's peak memory (vision or prompts, sample, update, eval, judge) is measured (memory.Meter: on a CPU the
kernel's peak resident set, free to read) and written to memory.json, next to the plan's estimate for a VLM planner.
The device and the planner's dtype are chosen once (memory.pick_device: `--device=auto|cuda|cpu`, bf16 where native),
printed and passed down; rewards are made on the CPU and cross to the device at one line of the step.

Run folder (`out_dir`): config.json (with versions and git commit), metrics.jsonl, memory.json, reward.png,
adapter/ (peft), cold_start/ (the adapter after the cold start, before GRPO), state.pt (LoRA weights, optimizer,
scheduler, step, RNG). Checkpoints are written atomically every `save_every` steps and at the end;
`--resume=True` continues from the last one, with the run's settings: only those in checkpoint.RESUMABLE (steps,
lr, ...) may differ from config.json.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# oneDNN, and PyTorch's layer over it, keep the compiled kernels of every matrix shape they meet, without bound; the
# update meets new shapes every step (each step's completions have their own length), and a cpu run grew by 15-40 MB
# a step. Bounded, they hold what a step uses. Read when torch first runs a oneDNN kernel.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

import torch  # noqa: E402

import config
import distributed
import memory
import reward
import rollout
import vlm
from agents import greedy_plans
from config import VLM_PRESETS, validate
from engine import choose_engine
from checkpoint import load_checkpoint, read_checkpoint, resumed_config, run_info, save_checkpoint, tidy_checkpoint
from coldstart import cold_start, make_prompts
from data import DataError, grpo_batch, sample_image
from phrasings import load_requests
from planner import cache_dir, load_planner
from regions import describe_requests
from registry import unload as unload_agents


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


def group_seed(seed, step, r, place):
    """The seed of one group's sampling generator: a function of the run's seed, the step, the dynamic-sampling
    round r and the prompt's place in it, and of nothing else (not of the rank that samples it)."""
    return (((seed * 100_003 + step) * 1_009 + r) * 65_536 + place) % 2**63


def lr_factor(step, warmup, total):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def evaluate(planner, samples, cfg):
    """Greedy plans for held-out samples, scored with the paper's reward. Returns mean format-valid rate, F1 per
    field, mean F1 and mean reward, plus the completions. Under torchrun each rank plans its share (every rank
    returns the scores of all)."""
    grammar = rollout.plan_grammar(planner.tok) if cfg.constrain else None
    mine = distributed.share(samples)
    texts = greedy_plans(planner, [s["instruction"] for s in mine], cfg.max_new_tokens, cfg.eval_batch,
                         [s.get("description") for s in mine], grammar,
                         [sample_image(s, cfg.image_size) for s in mine] if planner.processor else None) if mine else []
    texts = distributed.gather(texts, len(samples))
    rewards, info = reward.paper_rewards(texts, samples)
    out = {k: round(v.mean().item(), 4) for k, v in info.items()}
    out["reward"] = round(rewards.mean().item(), 4)
    if cfg.eval_judge:  # the paper's three criteria, 0-10, from the local judge; NaN when no plan ran
        judge = reward.Judge(planner, reward.Outcome(cfg.outcome_size, quality=False))
        _, judged = judge(distributed.share(texts), mine)
        out.update({f"judge_{k}": round(torch.tensor(distributed.gather(judged[k].tolist(), len(samples))).nanmean()
                                        .item(), 3) for k in ("completion", "quality", "preservation")})
    return out, texts


def decoder(planner, engine):
    """The planner as evaluations decode it: the rollout engine's merged copy where there is one, synced first (on
    the cpu preset it decodes in half the NF4 policy's time; in bf16, 88 of 100 held-out greedy plans came out the
    same as the policy's), else the policy."""
    if engine is None:
        return planner
    engine.sync(planner.policy)
    return dataclasses.replace(planner, policy=engine.model)


def load_policy(cfg, device, dtype, adapter=None):
    """The planner of cfg's preset in NF4 (or full precision: quantize=False) + LoRA on `lora_targets` (a fresh
    adapter, or the saved one in `adapter`), on `device`."""
    lora = dict(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, adapter=adapter,
                lora_targets=cfg.lora_targets, device=device, dtype=dtype)
    if cfg.preset not in VLM_PRESETS:  # unquantized: the NF4 numbers stored in full precision
        planner = load_planner(cfg.preset, dequantized=not cfg.quantize, **lora)
        rollout.use_group_attention(planner.model)  # the sampler's prompt keys once per group, as the merged copy's
        return planner
    name = cfg.planner or str(vlm.tiny_folder(cache_dir() / "tiny-qwen2.5-vl"))
    return vlm.load(name, max_pixels=cfg.max_pixels, quantize=cfg.quantize, **lora)


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
    if not distributed.is_main():  # the run folder is rank 0's
        return train, test, None
    if cfg.resume and not (out / "state.pt").exists():
        raise SystemExit(f"error: --resume=True but {out / 'state.pt'} does not exist")
    if not cfg.resume and (out / "state.pt").exists():
        raise SystemExit(f"error: {out} already holds a run; pass --resume=True or choose another --out_dir")
    settings = resumed_config(out, cfg) if cfg.resume else {**asdict(cfg), **run_info()}
    return train, test, settings


def log(out, history, row):
    history.append(row)
    if not distributed.is_main():
        return
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


def resume(out, policy, opt, sched, cfg, history):
    """Load the last checkpoint; returns its step. `history` gets the logged rows up to it (later ones are done
    again)."""
    state = distributed.broadcast(read_checkpoint(out) if distributed.is_main() else None)  # rank 0's folder
    start = load_checkpoint(out, policy, opt, sched, state)
    # lr, warmup and steps may differ from the saved run's (RESUMABLE): the saved optimizer and scheduler would
    # silently keep the old lr, so the schedule goes on from the saved step with the new ones
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for g in opt.param_groups:
        g["initial_lr"], g["lr"] = cfg.lr, cfg.lr * lr_factor(sched.last_epoch, cfg.warmup, cfg.steps)
    metrics = out / "metrics.jsonl"
    if distributed.is_main():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
        history.extend(r for r in rows if r["step"] <= start)
        metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
    print(f"resumed from {out / 'state.pt'} at step {start}")
    return start


def grpo_update(policy, params, opt, rounds, pad, cfg):
    """One policy update on the kept groups of a step's rounds (Groups; at most B groups in all): micro-batches of
    `micro_groups` groups, each with its reference pass (the adapter off) and loss, gradients accumulated, clipped,
    and one optimizer step unless the loss or the gradient norm is not finite (bf16 overflow: one such step would
    poison the LoRA weights and the optimizer's moments for good). Returns (mean loss, mean KL, gradient norm,
    engine gap, finite): the gap is the mean absolute difference per token between the log-probs the sampler
    reported and the policy's (see engine.py). Under torchrun: this rank's groups, the loss scaled by the count of
    all ranks' groups, and the gradients summed over ranks before the clip (every rank then takes the same step)."""
    G, loss_sum, kl_sum, gap, tokens = cfg.group_size, 0.0, 0.0, 0.0, 0
    n = int(distributed.total(sum(len(g.keep) for g in rounds)))
    for part in rounds:
        roll, keep = part.roll, part.keep
        for i in range(0, len(keep), cfg.micro_groups):
            gs = keep[i:i + cfg.micro_groups]
            rows = torch.tensor([b * G + g for b in gs for g in range(G)], device=roll.ids.device)
            ids, mask = roll.ids[rows], roll.mask[rows]
            sub, vis = [part.prompts[b] for b in gs], part.vision and part.vision.subset(gs)
            logp = rollout.completion_logp(policy, sub, ids, mask, pad, G, vis, cfg.temperature)
            ref_logp = logp.detach()  # beta = 0: no KL term, and no reference pass to pay for
            if cfg.beta:
                with torch.no_grad(), policy.disable_adapter():
                    ref_logp = rollout.completion_logp(policy, sub, ids, mask, pad, G, vis, cfg.temperature)
            loss, kl = grpo_loss(logp, logp.detach(), ref_logp, part.adv.view(-1)[rows], mask, cfg.clip, cfg.beta)
            gap += ((logp.detach() - roll.logp[rows]).abs() * mask).sum().item()
            tokens += mask.sum().item()
            (loss * len(gs) / n).backward()
            loss_sum, kl_sum = loss_sum + loss.item() * len(gs), kl_sum + kl.item() * len(gs)
    if n:
        distributed.sum_grads(params)
    loss_sum, kl_sum, gap, tokens = distributed.total(loss_sum, kl_sum, gap, tokens)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item() if n else 0.0
    finite = math.isfinite(loss_sum) and math.isfinite(norm)
    if n and finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / max(n, 1), kl_sum / max(n, 1), norm, gap / max(tokens, 1), finite


def print_table(history, n):
    """The held-out table of a run: one row per stage (zero-shot, cold start, after GRPO)."""
    names = {"eval zero-shot": "base, zero-shot", "eval cold start": "after cold start"}
    table = {names.get(h["phase"], "after GRPO"): h for h in history if h["phase"].startswith("eval")}
    print(f"\nheld-out split ({n} requests), greedy decoding:")
    print(f"{'':>18} {'format':>7} {'F1 act':>7} {'F1 subj':>7} {'F1 goal':>7} {'F1 mean':>7} {'reward':>7}")
    for name, h in table.items():
        print(f"{name:>18} " + " ".join(f"{h[k]:7.3f}" for k in
                                        ("format", "f1_action", "f1_subject", "f1_goal", "f1", "reward")))


def main(cfg, make_reward=reward.make_reward):
    """By cfg: the memory plan (dry_run), the held-out scores of a saved adapter (eval_adapter), or a training run.
    Returns the logged rows (the one row of the scores for eval_adapter, none for a dry run). `make_reward(cfg,
    planner)` builds the GRPO reward: a test or a fork passes its own."""
    validate(cfg)  # parse_args did too; a Config built in code is checked here
    if cfg.dry_run:
        world = max(cfg.world_size, int(os.environ.get("WORLD_SIZE", "1")))
        if world > 1:  # each rank samples and scores its share of a step's prompts, evaluates its share of batches
            print(f"memory plan per rank, {world} ranks: {math.ceil(cfg.batch_prompts / world)} of the step's "
                  f"{cfg.batch_prompts} prompts each")
            cfg = dataclasses.replace(cfg, batch_prompts=math.ceil(cfg.batch_prompts / world))
        memory.show(cfg)
        return []
    device, dtype, why = memory.pick_device(cfg.device, cfg.dtype)  # chosen here once; everything below is given them
    rank, world = distributed.init(device)  # under torchrun: this process's rank and its GPU
    if world > 1:
        device = distributed.local_device(device)
        why += f"; rank {rank} of {world}"
        if rank:  # one log: rank 0 prints; the others' errors still reach stderr
            sys.stdout = open(os.devnull, "w")
    print(f"device: {device} ({why}), planner compute dtype {str(dtype).removeprefix('torch.')}")
    if not cfg.eval_adapter:
        try:
            return train(cfg, device, dtype, make_reward)
        finally:
            distributed.close()
    if not (Path(cfg.eval_adapter) / "adapter_config.json").exists():
        raise SystemExit(f"error: {cfg.eval_adapter} is not an adapter folder (no adapter_config.json)")
    test = load_requests(cfg.eval_dir, "test", cfg.eval_n, seed=0)
    if cfg.describe:
        describe_requests(test)
    planner = load_policy(cfg, device, dtype, cfg.eval_adapter)
    try:
        scores, _ = evaluate(decoder(planner, choose_engine(cfg, planner, device)[0]), test, cfg)
    finally:
        distributed.close()
    print(f"{cfg.eval_adapter} on {len(test)} held-out requests: "
          + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return [{"phase": "eval adapter", "step": 0, **scores}]


def prepare(cfg, out, settings, train_set, test):
    """The perception text of every request (when cfg.describe), then the run folder: a resume's leftovers of a
    kill tidied, or a fresh run's stale metrics removed; config.json written."""
    if cfg.describe:
        t0 = time.time()
        describe_requests(test + train_set)
        unload_agents()  # ~0.23 GB resident; an outcome reward loads what it needs again
        print(f"perception text for {len({s.get('image_path') or s['image'] for s in train_set})} train images in "
              f"{time.time() - t0:.0f}s, e.g. {train_set[0]['description']!r}")
    if not distributed.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        tidy_checkpoint(out)
    elif (out / "metrics.jsonl").exists():  # a run killed before its first checkpoint: its rows are not this run's
        (out / "metrics.jsonl").unlink()
    (out / "config.json").write_text(json.dumps(settings, indent=2))


def setup(cfg, device, dtype):
    """The policy (NF4 planner + LoRA), its trainable parameters, the optimizer and schedule, and the meter."""
    torch.manual_seed(cfg.seed)
    import bitsandbytes  # noqa: F401  imported before the meter starts: library code is not model memory
    import peft  # noqa: F401
    meter, t0 = memory.Meter(device, cfg.meter, cfg.meter_ms / 1000), time.time()
    planner = load_policy(cfg, device, dtype)
    print(f"planner: {cfg.preset} in {'NF4' if cfg.quantize else 'full precision'} + LoRA r={cfg.lora_r}, "
          f"loaded in {time.time() - t0:.1f}s")
    if cfg.grad_checkpointing:
        planner.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        planner.model.enable_input_require_grads()
    params = [p for p in planner.policy.parameters() if p.requires_grad]
    return planner, params, *optimizer(params, device, cfg), meter


@dataclass
class Groups:
    """One round of a step's sampling: B' requests, their prompts, G completions each, rewards and advantages."""
    batch: list
    prompts: list
    vision: object           # vlm.Vision of the prompts' images, or None
    roll: rollout.Rollout    # (B'*G, T)
    rewards: torch.Tensor    # (B'*G,)
    info: dict               # the reward's parts, (B'*G,) each
    adv: torch.Tensor        # (B', G)
    keep: list               # the groups with signal (rewards not all alike), those the update trains on


def sample_groups(planner, sampler, batch, gen, score, meter, seconds, cfg, grammar):
    """Prompts, rollouts and rewards of `batch`, each prompt's group drawn from its generator in `gen` (adds to
    seconds["sample"] and seconds["reward"]). A rank's share may be empty."""
    G, tok, t = cfg.group_size, planner.tok, time.time()
    if not batch:
        return Groups([], [], None, None, torch.zeros(0), {}, torch.zeros(0, G), [])
    with meter.phase("vision" if planner.processor else "prompts"):
        prompts, vision = make_prompts(planner, batch, cfg)
    with meter.phase("sample"):
        roll = rollout.sample_group(sampler, prompts, G, cfg.max_new_tokens, rollout.stop_ids(tok, planner.model),
                                    tok.pad_token_id, cfg.temperature, cfg.top_p, gen, grammar=grammar, vision=vision)
    seconds["sample"] += time.time() - t
    t = time.time()
    # all B'*G completions scored in one call (on the CPU), then the one place they move to the policy's device
    with meter.phase("judge") if cfg.reward == "judge" else contextlib.nullcontext():
        rewards, info = score(rollout.decode(tok, roll), [s for s in batch for _ in range(G)])
    rewards = rewards.to(roll.ids.device)
    adv, signal = group_advantages(rewards.view(len(batch), G), cfg.reward_tol)    # (B', G), (B',)
    seconds["reward"] += time.time() - t
    return Groups(batch, prompts, vision, roll, rewards, info, adv, signal.nonzero().flatten().tolist())


def first_round(groups, B, G):
    """The rewards and reward parts of a step's first round over all ranks: per completion in the step's prompt
    order (a part one rank's reward left out, all NaN there, is NaN for its completions; one that is NaN for all is
    left out, as the reward does in one process), and the parts that count the whole batch (0-d) summed."""
    if distributed.WORLD == 1:
        return groups.rewards, groups.info
    per = {k: v for k, v in groups.info.items() if v.dim()}
    rows = distributed.gather([(groups.rewards[b * G:(b + 1) * G].tolist(),
                                {k: v[b * G:(b + 1) * G].tolist() for k, v in per.items()})
                               for b in range(len(groups.batch))], B)
    keys = list(dict.fromkeys(k for _, i in rows for k in i))
    info = {k: torch.tensor([x for _, i in rows for x in i.get(k, [math.nan] * G)]) for k in keys}
    info = {k: v for k, v in info.items() if not v.isnan().all()}
    for k in distributed.broadcast(sorted(k for k, v in groups.info.items() if not v.dim())):  # rank 0 has them all
        info[k] = torch.tensor(distributed.total(groups.info[k].item() if k in groups.info else 0.0))
    return torch.tensor([x for r, _ in rows for x in r]), info


def step_row(step, rounds, update, sched, meter, seconds, cfg):
    """The logged row of a GRPO step: the reward and the means of its parts over the step's first B prompts (as
    without dynamic sampling, so runs compare), the update (loss, KL, gradient norm, engine gap), sizes and times;
    counts over all ranks, times and memory this rank's."""
    loss, kl, norm, gap = update
    rewards, info = first_round(rounds[0], cfg.batch_prompts, cfg.group_size)
    kept, prompts, tokens = map(int, distributed.total(
        sum(len(g.keep) for g in rounds), sum(len(g.batch) for g in rounds),
        sum(int(g.roll.mask.sum()) for g in rounds if g.batch)))
    return {"phase": "grpo", "step": step + 1, "reward": round(rewards.mean().item(), 4),
            **{k: round(v.float().nanmean().item(), 4) for k, v in info.items()},
            "loss": round(loss, 5), "kl": round(kl, 5), "grad_norm": round(norm, 4), "engine_gap": round(gap, 5),
            "kept_groups": kept, "dropped_groups": cfg.batch_prompts - kept,
            "prompts": prompts, "lr": sched.get_last_lr()[0], "tokens": tokens,
            **{f"{k}_seconds": round(v, 2) for k, v in seconds.items()},
            "seconds": round(sum(seconds.values()), 2), "peak_gb": round(max(meter.peaks.values()) / 2**30, 3)}


def train(cfg, device, dtype, make_reward=reward.make_reward):
    """A run: checks, the planner, zero-shot and cold-start evaluations (or a resume), then the GRPO loop. Returns
    the logged rows."""
    from tqdm import tqdm
    out = Path(cfg.out_dir)
    train_set, test, settings = check_run(cfg, out)
    prepare(cfg, out, settings, train_set, test)
    planner, params, opt, sched, meter = setup(cfg, device, dtype)
    engine, why = choose_engine(cfg, planner, device)
    distributed.same_start(params)  # ranks: rank 0's LoRA init
    if distributed.WORLD > 1 and 0 < distributed.total(engine is not None) < distributed.WORLD:
        engine, why = None, "not every rank had the memory for a merged copy"  # ranks sample alike
    policy, tok, history = planner.policy, planner.tok, []
    print(f"rollout engine: {'merged' if engine else 'policy'} ({why})")
    sampler = engine.model if engine else policy
    evaluate_now = lambda phase, step: heldout(  # noqa: E731
        decoder(planner, engine), test, cfg, meter, out, history, phase, step)
    start = resume(out, policy, opt, sched, cfg, history) if cfg.resume else cold_start(
        planner, train_set, cfg, out, opt, sched, evaluate_now, meter)
    if engine:
        engine.sync(policy)
    score, pad, B = make_reward(cfg, planner), tok.pad_token_id, cfg.batch_prompts
    grammar, bad, longest = rollout.plan_grammar(tok) if cfg.constrain else None, 0, 0
    for step in tqdm(range(start, cfg.steps), desc="grpo", initial=start, total=cfg.steps, disable=None):
        t0, seconds = time.time(), {"sample": 0.0, "reward": 0.0}
        # B prompts, G completions each, scored; then dynamic sampling: up to cfg.resample rounds of fresh prompts
        # for the groups without signal. Prompts are fixed by (seed, step, round) and each group's tokens by its
        # generator's seed (seed, step, round, its place), so runs replay, with any number of ranks (each samples
        # its share of the prompts).
        policy.eval()
        rounds, kept = [], 0
        for r in range(cfg.resample + 1):
            if kept == B:
                break
            batch = grpo_batch(train_set, cfg.seed, step, B - kept, r)
            gens = [torch.Generator(device).manual_seed(group_seed(cfg.seed, step, r, i)) for i in range(len(batch))]
            groups = sample_groups(planner, sampler, distributed.share(batch), distributed.share(gens), score,
                                   meter, seconds, cfg, grammar)
            longest = max([longest, *map(len, groups.prompts)])
            kept += int(distributed.total(len(groups.keep)))
            rounds.append(groups)
        policy.train()
        with meter.phase("update"):
            t = time.time()
            loss, kl, norm, gap, finite = grpo_update(policy, params, opt, rounds, pad, cfg)
            if engine and finite:
                engine.sync(policy)
            seconds["update"] = time.time() - t
        sched.step()  # the schedule follows the step number, skipped or not
        bad = 0 if finite else bad + 1
        if not finite:
            skip(step, loss, norm, bad, cfg, out)
            continue
        row = step_row(step, rounds, (loss, kl, norm, gap), sched, meter, seconds, cfg)
        log(out, history, row)
        tqdm.write(f"step {step + 1}/{cfg.steps} | reward {row['reward']:.3f} fmt {row['format']:.2f} "
                   f"f1 {row['f1']:.3f} | groups {row['kept_groups']}/{B} ({row['prompts']} prompts) | loss "
                   f"{row['loss']:+.4f} kl {row['kl']:.4f} | gnorm {norm:.3f} lr {row['lr']:.1e} | "
                   f"{time.time() - t0:.1f}s")
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            evaluate_now("eval", step + 1)
        if ((step + 1) % cfg.save_every == 0 or last) and distributed.is_main():
            save_checkpoint(out, policy, opt, sched, step + 1)
            plot(out, history)
    if distributed.is_main():
        memory.report(meter, cfg, planner, out, longest)
    print_table(history, len(test))
    return history


def skip(step, loss, norm, bad, cfg, out):
    """A step whose loss or gradient norm was not finite was skipped: say so, and stop after max_bad_steps."""
    what = "loss" if not math.isfinite(loss) else f"gradient norm ({norm})"
    print(f"step {step + 1}: non-finite {what}, step skipped ({bad} in a row)")
    if bad >= cfg.max_bad_steps:
        raise SystemExit(f"error: non-finite {what} {bad} steps in a row; lower lr (now {cfg.lr}) "
                         f"or check the data. Last checkpoint: {out / 'state.pt'}")


def parse_args(argv):
    """config.parse_args, with this file's commands in --help."""
    return config.parse_args(argv, __doc__.strip().split("\n\n")[1])


if __name__ == "__main__":
    try:
        main(parse_args(sys.argv[1:]))
    except DataError as e:  # bad dataset input: the message says what and where; no traceback needed
        sys.exit(f"error: {e}")
