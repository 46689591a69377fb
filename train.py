"""
Train the decomposition agent (the planner) with GRPO.

    python train.py                         # the cpu preset: SmolLM2-135M in 4-bit + LoRA, on any machine
    python train.py --preset=tiny --eval_n=8
    python train.py --lora_r=8 --seed=1     # any Config field as --key=value

State of this file: the configuration, presets and the held-out evaluation are here; the GRPO loop itself lands
with the next issue. Today `python train.py` loads the preset's planner and reports its zero-shot scores on the
held-out split (format-valid rate, F1 per field, the paper's reward), the first row of the training table.
"""
import ast
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch


@dataclass
class Config:
    preset: str = "cpu"                  # cpu | tiny | gpu24 (see PRESETS)
    seed: int = 0                        # one seed for data, sampling and init
    out_dir: str = "runs/default"        # run folder: config.json, metrics.jsonl, adapter/, state.pt
    # planner and LoRA
    lora_r: int = 16                     # LoRA rank
    lora_alpha: int = 32                 # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0            # dropout inside LoRA (0 keeps rollouts and updates consistent)
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names that get adapters
    # sampling
    group_size: int = 8                  # G completions per prompt
    max_new_tokens: int = 64             # plans are short; longer completions are cut
    temperature: float = 1.0             # sampling temperature of rollouts (evaluation is greedy)
    top_p: float = 1.0                   # nucleus sampling of rollouts
    # evaluation
    eval_n: int = 200                    # held-out requests scored per evaluation
    eval_batch: int = 16                 # prompts decoded together during evaluation


PRESETS = {
    "cpu": {},
    "tiny": dict(lora_r=4, lora_alpha=8, group_size=4, max_new_tokens=16, eval_n=8, eval_batch=4),
    "gpu24": dict(lora_r=64, lora_alpha=128, group_size=8, max_new_tokens=128, eval_batch=32),
}


def parse_args(argv):
    """--key=value overrides on top of a preset. Values are Python literals, else strings. Unknown keys and
    wrong types are errors that name the key."""
    kv = {}
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"error: arguments are --key=value, got {a!r}")
        k, v = a[2:].split("=", 1)
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass  # a plain string
        kv[k] = v
    preset = kv.get("preset", Config.preset)
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
    return cfg


@torch.no_grad()
def evaluate(planner, samples, cfg):
    """Greedy plans for held-out samples, scored with the paper's reward. Returns mean format-valid rate, F1 per
    field, mean F1 and mean reward, plus the completions."""
    from reward import paper_rewards
    from rollout import build_prompt, decode, sample_group, stop_ids
    planner.policy.eval()
    texts = []
    for i in range(0, len(samples), cfg.eval_batch):
        batch = samples[i:i + cfg.eval_batch]
        prompts = [build_prompt(planner.tok, s["instruction"]) for s in batch]
        r = sample_group(planner.policy, prompts, 1, cfg.max_new_tokens, stop_ids(planner.tok),
                         planner.tok.pad_token_id, temperature=0)
        texts += decode(planner.tok, r)
    rewards, info = paper_rewards(texts, samples)
    out = {k: round(v.mean().item(), 4) for k, v in info.items()}
    out["reward"] = round(rewards.mean().item(), 4)
    return out, texts


def main(cfg):
    from agents import load_planner
    from data import make_split
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    planner = load_planner(cfg.preset, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           lora_targets=cfg.lora_targets)
    print(f"planner: {cfg.preset} loaded in {time.time() - t0:.1f}s (NF4 + LoRA r={cfg.lora_r}), device cpu")
    test = make_split("test", cfg.eval_n, seed=cfg.seed)
    t0 = time.time()
    scores, texts = evaluate(planner, test, cfg)
    print(f"zero-shot on {len(test)} held-out requests ({time.time() - t0:.0f}s): " +
          " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    print(f"example: {test[0]['instruction']!r}\n      -> {texts[0]!r}")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "zero-shot", "step": 0, **scores}) + "\n")
    print("GRPO training is not implemented yet (next issue); scores written to", out / "metrics.jsonl")
    return scores


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
