"""
Checkpoints of a training run, in its run folder: adapter/ (peft, for users), state.pt (everything resume needs),
config.json (the settings, with versions and git commit). Writes are atomic renames; a kill at any moment leaves a
complete state.pt, and whatever else it leaves is cleared by the next save or resume. A resume keeps the run's
settings: only those in RESUMABLE may differ from its config.json.
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch


def run_info():
    """Versions and git commit, written into config.json so a run can be traced to its code."""
    import peft
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0], "git_commit": commit or "unknown"}


def to_cpu(x):
    """Nested dicts and lists with every tensor copied to the CPU: a checkpoint that loads on any machine (resume
    moves LoRA weights and optimizer state back onto the parameters' device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    return type(x)(map(to_cpu, x)) if isinstance(x, (list, tuple)) else x


def tidy_checkpoint(out):
    """Clear what a kill inside save_checkpoint leaves behind. .adapter.old is deleted only while adapter/ exists,
    so an .adapter.old without adapter/ is the complete previous adapter (killed between the two renames): it is
    put back. Partial .adapter.tmp and state.pt.tmp are deleted."""
    import shutil
    tmp, old, adapter = out / ".adapter.tmp", out / ".adapter.old", out / "adapter"
    if old.exists() and not adapter.exists():
        os.replace(old, adapter)
    for d in (old, tmp):
        if d.exists():
            shutil.rmtree(d)
    (out / "state.pt.tmp").unlink(missing_ok=True)


def save_checkpoint(out, policy, opt, sched, step):
    """adapter/ (peft format, for users) is swapped in from a temporary folder; state.pt (everything resume needs,
    LoRA weights included) is replaced atomically last. A kill at any moment leaves a complete state.pt, and
    whatever else it leaves is cleared by the next save (tidy_checkpoint)."""
    import shutil
    tmp, old, adapter = out / ".adapter.tmp", out / ".adapter.old", out / "adapter"
    tidy_checkpoint(out)
    policy.save_pretrained(tmp)
    if adapter.exists():
        os.replace(adapter, old)
    os.replace(tmp, adapter)
    if old.exists():
        shutil.rmtree(old)
    lora = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    state = {"step": step, "lora": to_cpu(lora), "opt": to_cpu(opt.state_dict()), "sched": sched.state_dict(),
             "rng": torch.get_rng_state()}
    torch.save(state, out / "state.pt.tmp")
    os.replace(out / "state.pt.tmp", out / "state.pt")


def read_checkpoint(out):
    """out/state.pt, loaded with weights_only=True: a checkpoint holds tensors and plain values, nothing that runs
    code on load."""
    import pickle
    path = out / "state.pt"
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        why = str(e).split("\n")[0]
        raise SystemExit(f"error: cannot load {path} ({type(e).__name__}: {why}); a checkpoint of train.py holds "
                         "tensors and plain values only, and loads with weights_only=True") from e


def load_checkpoint(out, policy, opt, sched, state=None):
    """Load out/state.pt (or its `state`, read already: read_checkpoint) into the policy's LoRA weights, the
    optimizer and the scheduler, set the RNG, and return its step. Every LoRA weight of the policy must be in it
    with its shape, and nothing else: load_state_dict(strict=False) alone would skip a missing one silently (the
    base model's weights are never in it, so strict=True cannot be used)."""
    path, state = out / "state.pt", state or read_checkpoint(out)
    mine, saved = {k: v for k, v in policy.state_dict().items() if "lora_" in k}, state["lora"]
    missing, extra = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
    shape = [f"{k} {tuple(saved[k].shape)} here {tuple(mine[k].shape)}" for k in sorted(mine.keys() & saved.keys())
             if saved[k].shape != mine[k].shape]
    if missing or extra or shape:
        raise SystemExit(f"error: {path} does not fit this planner's LoRA adapter: " + "; ".join(
            f"{len(v)} {what} (first: {v[0]})" for what, v in (("missing", missing), ("unexpected", extra),
                                                                ("of another shape", shape)) if v))
    policy.load_state_dict(saved, strict=False)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    return state["step"]


# On resume these may differ from the run's config.json: they decide how long and how fast it goes on, where and in
# how much memory, not what was trained on what. Every other field must match (a new field too, until it is added
# here): it changes the model, the data, the prompts, the cold start already done, or what a logged number means.
RESUMABLE = ("resume", "out_dir", "device", "dry_run", "eval_adapter", "steps", "lr", "warmup", "grad_clip",
             "max_bad_steps", "micro_groups", "grad_checkpointing", "eval_every", "eval_batch", "eval_judge",
             "save_every", "engine", "meter", "meter_ms", "dtype", "world_size")


def resumed_config(out, cfg):
    """The config.json of a resumed run: its saved settings checked against cfg, refused with every differing field
    listed; else cfg's settings with the run info of its start kept and this resume (changes, versions) added."""
    path = out / "config.json"
    if not path.exists():
        raise SystemExit(f"error: --resume=True but {path} is missing, so the run's settings cannot be checked")
    saved, now = json.loads(path.read_text()), json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as saved
    differ = [f"{k}: saved {saved.get(k, '(none)')!r}, now {v!r}" for k, v in now.items()
              if k not in RESUMABLE and saved.get(k) != v]
    if differ:
        raise SystemExit(f"error: --resume=True with settings that differ from {path}:\n  " + "\n  ".join(differ) +
                         "\nthey change the model, the data or what the logged numbers mean; pass the saved values, "
                         "or start a new run in another --out_dir")
    changed = {k: [saved.get(k), v] for k, v in now.items() if k != "resume" and saved.get(k) != v}
    for k, (a, b) in changed.items():
        print(f"resume: {k} {a!r} -> {b!r}")
    start = {k: v for k, v in saved.items() if k not in now}  # versions and git commit at the run's start
    start["resumes"] = start.get("resumes", []) + [{"changed": changed, **run_info()}]
    return {**now, **start}
