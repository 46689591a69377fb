"""
The supervised cold start: before GRPO, the planner learns the tag format and a first reading of requests from a
few labelled ones (`sft_steps` steps on at most `sft_n` requests, 10% of the train split). train.py runs it on a
fresh run; bench.py runs it alone (`python bench.py coldstart`).
"""
import contextlib
import math
import random

import torch

import distributed
import rollout
import vlm
from checkpoint import save_checkpoint
from data import sample_image
from plan import format_plan


def make_prompts(planner, samples, cfg):
    """The prompts of labelled requests: token ids, and for a VLM planner the Vision of their images (else None)."""
    if planner.processor is None:
        return [rollout.build_prompt(planner.tok, s["instruction"], s.get("description")) for s in samples], None
    return vlm.prompts(planner, [s["instruction"] for s in samples],
                       [sample_image(s, cfg.image_size) for s in samples])


def sft(planner, samples, cfg, meter=None):
    """Supervised cold start: teacher-forced log-likelihood of the gold plan (and the end-of-turn token), each step's
    `sft_batch` requests in backward passes of `sft_micro` (the gradient accumulated; the memory of a pass grows with
    its requests: 2.66 GB resident for 8 at once on the cpu preset). Measured as the meter's "cold start" phase.
    A step whose loss or gradient norm is not finite is skipped, as in GRPO; max_bad_steps in a row stop the run.
    Under torchrun each rank runs its share of a step's backward passes and the gradients are summed: the same
    passes as in one process, so the same step."""
    tok, policy = planner.tok, planner.policy
    end, rng = tok.convert_tokens_to_ids("<|im_end|>"), random.Random(cfg.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr)
    policy.train()
    bad = 0
    for step in range(cfg.sft_steps):
        batch = rng.sample(samples, min(cfg.sft_batch, len(samples)))
        targets = [tok(format_plan(s["action"], s["subject"], s["goal"]), add_special_tokens=False)["input_ids"]
                   + [end] for s in batch]
        tokens, total = sum(map(len, targets)), 0.0  # the step's, over all ranks
        with meter.phase("cold start") if meter else contextlib.nullcontext():
            for i in distributed.share(range(0, len(batch), cfg.sft_micro)):  # a rank's share of the passes
                part = targets[i:i + cfg.sft_micro]
                prompts, vision = make_prompts(planner, batch[i:i + cfg.sft_micro], cfg)
                T = max(len(t) for t in part)
                ids = torch.tensor([t + [tok.pad_token_id] * (T - len(t)) for t in part], device=policy.device)
                mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in part], device=policy.device)
                loss = -rollout.completion_logp(policy, prompts, ids, mask, tok.pad_token_id, vision=vision).sum()
                (loss / tokens).backward()  # the mean over all the step's tokens, as one pass would take it
                total += loss.item()
            distributed.sum_grads(params)
            total = distributed.total(total)
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            finite = math.isfinite(total) and math.isfinite(norm)
            if finite:  # a NaN or inf gradient never reaches the weights
                opt.step()
            opt.zero_grad(set_to_none=True)
        bad, what = 0 if finite else bad + 1, "loss" if not math.isfinite(total) else f"gradient norm ({norm})"
        print(f"sft {step + 1}/{cfg.sft_steps} | loss {total / tokens:.3f}" +
              ("" if finite else f" | non-finite {what}, step skipped"))
        if bad >= cfg.max_bad_steps:
            raise SystemExit(f"error: cold start: non-finite loss or gradient {bad} steps in a row; lower sft_lr (now "
                             f"{cfg.sft_lr}) or check the data")


def cold_start(planner, train_set, cfg, out, opt, sched, evaluate_now, meter=None):
    """A fresh run's start: the zero-shot score, the supervised cold start and its score, its adapter saved for
    eval.py (the untrained team's planner), and the step-0 checkpoint. Returns the step to start at, 0."""
    evaluate_now("eval zero-shot", 0)
    if cfg.sft_steps:
        sft(planner, train_set[:cfg.sft_n], cfg, meter)
        evaluate_now("eval cold start", 0)
    if distributed.is_main():
        if cfg.sft_steps:
            planner.policy.save_pretrained(out / "cold_start")
        save_checkpoint(out, planner.policy, opt, sched, 0)
    return 0
