"""
The configuration of a training run: every field with its default and what it does (`Config`; its comments are
the text of `python train.py --help`), the presets that override some of them, and the command line's parsing and
range checks. train.py, memory.py (the memory plan of a config) and checkpoint.py (which fields a resume may
change) read a Config; nothing here loads a model.
"""
import ast
import math
from dataclasses import asdict, dataclass, fields

import torch

import vlm


@dataclass
class Config:
    preset: str = "auto"                 # cpu | tiny | gpu24 | tiny_vl (see PRESETS); auto picks one for this machine
    device: str = "auto"                 # where the planner runs: auto (the CUDA GPU if any, else cpu), cuda, cpu
    dtype: str = "auto"                  # the planner's compute dtype: auto (bf16 where the device multiplies it
                                         # natively: GPUs, CPUs with AVX512-BF16 or AMX; else fp32), bfloat16, float32
    quantize: bool = True                # the planner's base in NF4; False: in full precision (more memory)
    planner: str = ""                    # the VLM planner (gpu24, tiny_vl): a hub id or a local folder
    max_pixels: int = 448 * 448          # VLM planner: each image is resized to at most this many pixels
    image_size: int = 448                # VLM planner: built-in images are drawn at this many pixels a side
    dry_run: bool = False                # print the memory plan of this config (memory.py) and stop
    seed: int = 0                        # one seed for data, sampling and init
    out_dir: str = "runs/default"        # run folder: config.json, metrics.jsonl, adapter/, state.pt
    resume: bool = False                 # continue from out_dir/state.pt
    eval_adapter: str = ""               # only score this saved adapter folder on the held-out split, no training
    world_size: int = 1                  # ranks the dry run's memory plan is for (torchrun runs train.py once per
                                         # rank and sets the real number; see distributed.py)
    # planner and LoRA
    lora_r: int = 16                     # LoRA rank
    lora_alpha: int = 32                 # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0            # dropout inside LoRA (0 keeps rollouts and updates consistent)
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                                         # module names that get adapters: attention and MLP (see docs/results.md)
    # data (built-in synthetic requests unless a dataset folder is given)
    train_dir: str = ""                  # a metadata.jsonl folder with labels to train on instead
    eval_dir: str = ""                   # a metadata.jsonl folder with labels for the held-out scores instead
    train_n: int = 2000                  # train requests used (the RL prompts; first train_n of a folder)
    describe: bool = True                # prompts carry the perception text of the request's image (edit.py does)
    # supervised cold start (the tag format and a first reading of requests, on a small labelled share)
    sft_n: int = 200                     # labelled requests for the cold start, at most 10% of train_n
    sft_steps: int = 30                  # optimizer steps of the cold start (0: none)
    sft_batch: int = 8                   # requests per cold-start step
    sft_micro: int = 4                   # requests per cold-start backward pass (gradient accumulation over the rest)
    sft_lr: float = 1e-3                 # cold-start learning rate
    # GRPO
    steps: int = 25                      # GRPO steps
    batch_prompts: int = 4               # B prompts per step
    group_size: int = 8                  # G completions per prompt
    resample: int = 2                    # dynamic sampling: up to this many rounds of fresh prompts per step for the
                                         # groups without signal (all G plans scored alike), so that a step trains
                                         # on up to B groups that teach something; 0: off
    max_new_tokens: int = 48             # plans are short; longer completions are cut
    constrain: bool = True               # decode plans with rollout.PlanGrammar: only actions and goals the CPU
                                         # editor reads (rollouts, evaluation and edit.py alike)
    engine: str = "auto"                 # where rollouts are sampled from: policy (the NF4 + LoRA model), merged (a
                                         # plain bf16/fp32 copy with the adapter merged after each update; text
                                         # planners), auto (merged where it fits); see engine.py
    temperature: float = 0.8             # sampling temperature of rollouts (evaluation is greedy)
    top_p: float = 1.0                   # nucleus sampling of rollouts
    lr: float = 3e-4                     # GRPO learning rate (the paper's 1e-6 is for full 7B weights, not LoRA)
    warmup: int = 3                      # linear warm-up steps, then cosine decay to 10%
    beta: float = 0.0                    # weight of the k3 KL penalty to the reference, the base model with the
                                         # adapter off (before the cold start); 0: no KL term and no reference pass
    clip: float = 0.2                    # PPO clip range of the ratio
    micro_groups: int = 1                # groups per backward pass (gradient accumulation over the rest); 1 keeps
                                         # the cpu preset's update near 3 GB resident (2: ~0.9 GB more, 4: ~2.5 GB)
    grad_clip: float = 1.0               # max gradient norm
    grad_checkpointing: bool = False     # recompute activations in backward (saves memory on long sequences)
    max_bad_steps: int = 3               # stop after this many non-finite losses in a row
    # reward: "paper" (format + per-field F1, never looks at the image), "edits" (format + F1 over whole edits:
    # plan.edit_f1), "outcome" (run the plan, score the edited image),
    # "both" (outcome_mix * outcome + (1 - outcome_mix) * paper), "judge" (run the plan, the VLM planner's base
    # scores the edit 0-10: completion, quality, preservation; VLM presets only); see reward.py
    reward: str = "edits"
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
    meter: str = "rss"                   # peak memory per phase on a CPU (a GPU: CUDA's allocator peak, free): rss
                                         # (the kernel's peak resident set, free to read), heap (tensors + glibc's
                                         # bytes in use, read every meter_ms: what the memory plan's checks use; it
                                         # stalls the run), off; see memory.Meter
    meter_ms: float = 0.5                # the heap meter's reading interval


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
PRESETS = {
    "cpu": {},
    "tiny": dict(lora_r=4, lora_alpha=8, train_n=40, sft_n=4, sft_steps=2, sft_batch=2, steps=4, batch_prompts=2,
                 group_size=4, max_new_tokens=12, eval_n=4, eval_batch=4, eval_every=2, save_every=2, lr=1e-2,
                 describe=False, constrain=False),
    # The paper's planner, which sees the image (so no perception text); diffusers editors read free text.
    # Its adapter stays on attention only, as the memory plan was measured (on the MLP too: ~120M more LoRA weights).
    "gpu24": dict(planner="Qwen/Qwen2.5-VL-7B-Instruct", lora_r=64, lora_alpha=128, lora_targets=ATTENTION,
                  max_new_tokens=128, batch_prompts=8, micro_groups=2, eval_batch=32, grad_checkpointing=True,
                  constrain=False, describe=False),
    # gpu24's code path (Qwen2.5-VL class, images in the prompt) on a random tiny model, on any machine: tests.
    "tiny_vl": dict(planner="", lora_r=4, lora_alpha=8, lora_targets=ATTENTION, train_n=40, sft_n=4, sft_steps=2,
                    sft_batch=2, steps=4, batch_prompts=2, group_size=4, max_new_tokens=12, eval_n=4, eval_batch=4,
                    eval_every=2, save_every=2, lr=1e-2, describe=False, constrain=False, max_pixels=112 * 112,
                    image_size=112),
}
VLM_PRESETS = ("gpu24", "tiny_vl")


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


def parse_args(argv, commands=""):
    """--key=value overrides on top of a preset. Values are Python literals, else strings. Unknown keys, wrong
    types and values out of range are errors that name the key; -h or --help prints `commands` (the entry point's
    examples), then the fields, and exits."""
    if "-h" in argv or "--help" in argv:
        print(usage(commands))
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


def usage(commands=""):
    """The text of --help: `commands`, then every Config field with its default and comment, read from Config's
    source so that the comments stay the one place where a field is explained."""
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
             commands,
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

    for k in ("lora_r", "lora_alpha", "train_n", "sft_batch", "sft_micro", "steps", "batch_prompts", "max_new_tokens",
              "micro_groups", "max_bad_steps", "eval_n", "eval_batch", "eval_every", "save_every", "world_size"):
        need(k, getattr(cfg, k) >= 1, "an int >= 1")
    for k in ("seed", "sft_n", "sft_steps", "warmup", "resample"):
        need(k, getattr(cfg, k) >= 0, "an int >= 0")
    for k in ("lr", "sft_lr", "temperature", "clip", "grad_clip"):
        need(k, number(getattr(cfg, k)) and getattr(cfg, k) > 0, "a finite number > 0")
    for k in ("beta", "reward_tol"):
        need(k, number(getattr(cfg, k)) and getattr(cfg, k) >= 0, "a finite number >= 0")
    need("meter_ms", number(cfg.meter_ms) and cfg.meter_ms > 0, "a finite number > 0")
    need("meter", cfg.meter in ("rss", "heap", "off"), "rss, heap, off")
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
    need("reward", cfg.reward in ("paper", "edits", "outcome", "both", "judge"), "paper, edits, outcome, both or judge")
    need("dtype", cfg.dtype in ("auto", "bfloat16", "float32"), "auto, bfloat16 or float32")
    need("engine", cfg.engine in ("auto", "policy", "merged"), "auto, policy or merged")
    need("engine", cfg.engine != "merged" or cfg.preset not in VLM_PRESETS, f"policy or auto with preset "
                                                                           f"{cfg.preset} (merged: text planners)")
    if (cfg.reward == "judge" or cfg.eval_judge) and cfg.preset not in VLM_PRESETS:
        raise SystemExit(f"error: reward=judge and eval_judge need a VLM planner (preset gpu24 or tiny_vl), not "
                         f"{cfg.preset}: the judge is the planner's own base model, looking at the images")
    need("sft_n", cfg.sft_n <= cfg.train_n // 10, f"at most 10% of train_n={cfg.train_n}, {cfg.train_n // 10} (the "
                                                  "cold start is a small labelled share, the RL must do the rest)")
    need("sft_n", cfg.sft_n >= 1 or not cfg.sft_steps, f">= 1 with sft_steps={cfg.sft_steps} (or sft_steps=0: no "
                                                        "cold start)")
