"""
Benchmarks.

    python bench.py                      # sampler: the cpu planner, 4 prompts x G=8, 64 new tokens, three ways
    python bench.py --preset=tiny --repeats=3
    python bench.py step [--against=DIR] # GRPO steps at the cpu defaults: each engine, meter on/off, G and length

    python bench.py load                 # the cpu planner: first load (with the GGUF conversion) and second load
    python bench.py seeds runs/seed0 runs/seed1 runs/seed2   # the README's table over training runs
    python bench.py edit [ADAPTER]       # edit.py on a 512x512 photo: cold (empty cache), then 5 warm runs
    python bench.py sequencer            # the zero-shot sequencing model against the rule order, 40 plans
    python bench.py outcome [ADAPTER]    # the outcome reward: a group of 8 sampled plans scored, with/without cache
    python bench.py coldstart --sft_n=2000 --sft_steps=100 [--key=value ...] [--system=FILE]
                                         # a supervised cold start alone, past the 10% rule, then the held-out scores

sampler: group sampling speed of Hugging Face `generate(num_return_sequences=G)` on the policy (NF4 + LoRA), our
KV-cached sampler on the policy, and our sampler on the merged rollout engine (engine.py), side by side on the same
prompts (train requests with their perception line). All sample at temperature 1 with no stop token, so each call
makes exactly prompts * G * new_tokens tokens; tokens per second = that / wall time of one call (prefill included).
"""
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import memory
from agents import sequence
from data import builtin_image
from engine import Merged
from phrasings import load_requests, make_split
from plan import STAGE
from planner import load_planner, newest_adapter, planner_folder
from regions import describe_requests
from reward import Outcome, format_plan
from rollout import build_prompt, decode, left_pad, sample_group, stop_ids


def main(preset="cpu", group_size=8, new_tokens=64, prompts=4, repeats=3, threads=0):
    if threads:
        torch.set_num_threads(threads)
    device, dtype, _ = memory.pick_device()
    planner = load_planner(preset, dtype=dtype)
    policy, tok = planner.policy, planner.tok
    copy = Merged(planner_folder(preset), dtype, device)
    copy.sync(policy)
    # real planner prompts: train requests with the perception line of their image
    batch = load_requests("", "train", prompts, seed=0)
    describe_requests(batch)
    texts = [build_prompt(tok, s["instruction"], s["description"]) for s in batch]
    ids, attn, _ = left_pad(texts, tok.pad_token_id, device)
    policy.eval()

    def ours(model):
        def run(seed):
            g = torch.Generator(device).manual_seed(seed)
            with torch.no_grad():
                r = sample_group(model, texts, group_size, new_tokens, stop=[], pad_id=tok.pad_token_id, generator=g)
            return r.ids.numel()
        return run

    def hf(seed):
        torch.manual_seed(seed)
        out = policy.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              num_return_sequences=group_size, pad_token_id=tok.pad_token_id)
        return out[:, ids.shape[1]:].numel()

    print(f"preset={preset} {prompts} prompts ({min(map(len, texts))}-{max(map(len, texts))} tokens) x G={group_size}"
          f", {new_tokens} new tokens, {str(dtype).removeprefix('torch.')}, threads={torch.get_num_threads()}, "
          f"median of {repeats}")
    ways = {"generate (policy)": hf, "sample_group (policy)": ours(policy), "sample_group (merged)": ours(copy.model)}
    rates = {name: [] for name in ways}
    for fn in ways.values():
        fn(0)  # warm-up: first calls pay one-time costs
    for i in range(repeats):  # round-robin: a machine that speeds up or slows down during the run favours no one
        for name, fn in ways.items():
            t0 = time.perf_counter()
            n = fn(i + 1)
            rates[name].append(n / (time.perf_counter() - t0))
            assert n == prompts * group_size * new_tokens, f"{name} made {n} tokens"
    rows = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:>22}: {rows[name]:7.1f} tokens/s  (runs: {', '.join(f'{x:.1f}' for x in r)})")
    base = rows["generate (policy)"]
    print("speed-up over generate: " + ", ".join(f"{k.split()[1]} {v / base:.2f}x" for k, v in rows.items()
                                                  if k != "generate (policy)"))
    return rows


def step(*argv):
    """GRPO steps at the cpu defaults, each configuration a `python train.py` of its own (same seed, so the same
    prompts): the policy engine, the merged engine, the merged engine with the meter off, optionally the train.py of
    another checkout (--against=DIR, e.g. a worktree of an earlier commit, run with only the options it knows), then
    step time against G and max_new_tokens on the merged engine. Each run: no cold start, `--steps` GRPO steps
    (default 3), the held-out split cut to 20 requests. Prints seconds per step split into sampling, reward, update,
    the seconds of one held-out evaluation, sampled tokens per second and the peak memory of the run."""
    import re
    import subprocess
    if any(a in ("-h", "--help") for a in argv):
        return print(step.__doc__)
    bad = [a for a in argv if not a.startswith(("--steps=", "--against=", "--scaling="))]
    if bad:
        raise SystemExit(f"error: bench.py step takes --steps=N, --against=DIR, --scaling=False; got {bad[0]!r}")
    opts = dict(a[2:].split("=", 1) for a in argv)
    steps, against = int(opts.get("steps", 3)), opts.get("against")  # --scaling=False: no G / length table
    here = Path(__file__).resolve().parent
    base = ["--preset=cpu", "--sft_steps=0", f"--steps={steps}", f"--eval_every={steps}", "--eval_n=20"]

    def run(name, args, root=here):
        out = Path(tempfile.mkdtemp(prefix="bench-step-"))
        t = time.time()
        # dynamic sampling off: each step the same B prompts and tokens as a train.py without it (--against)
        args = args + ["--resample=0"] * (root == here)
        log = subprocess.run([sys.executable, "train.py", *base, *args, f"--out_dir={out}"], cwd=root,
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if log.returncode:
            raise SystemExit(f"{name}: train.py failed:\n{log.stdout[-2000:]}{log.stderr[-2000:]}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        grpo = [r for r in rows if r["phase"] == "grpo"]
        mean = lambda k: statistics.mean(r.get(k, 0) for r in grpo)  # noqa: E731
        evals = [int(x) for x in re.findall(r"held-out, (\d+)s\)", log.stdout)]
        sample, total = mean("sample_seconds"), mean("seconds")
        mem = json.loads((out / "memory.json").read_text()) if (out / "memory.json").exists() else {}
        row = {"config": name, "step_s": total, "sample_s": sample, "reward_s": mean("reward_seconds"),
               "meter_ms": 1e3 * mem.get("meter_seconds", 0) / len(grpo),  # the meter's own time, per step
               "update_s": total - sample - mean("reward_seconds"), "eval_s": evals[-1],
               "tokens_per_s": sum(r["tokens"] for r in grpo) / sum(r["sample_seconds"] for r in grpo),
               "peak_gb": max(r["peak_gb"] for r in grpo), "gap": mean("engine_gap"), "wall_s": time.time() - t}
        print(f"{name:>34} | {row['step_s']:6.1f} s/step = sample {sample:5.1f} + reward {row['reward_s']:4.2f} + "
              f"update {row['update_s']:5.1f} | eval {row['eval_s']:3d} s | {row['tokens_per_s']:6.1f} tok/s | "
              f"peak {row['peak_gb']:.2f} GB | engine gap {row['gap']:.4f} | meter {row['meter_ms']:.2f} ms/step",
              flush=True)
        return row

    print(f"GRPO steps at the cpu defaults ({steps} steps per run, means; eval: one held-out pass of 20 requests)")
    rows = [run("engine=policy", ["--engine=policy"]), run("engine=merged", ["--engine=merged"]),
            run("engine=merged, meter off", ["--engine=merged", "--meter=off"])]
    if against:
        rows.append(run(f"train.py of {against}", [], Path(against)))
    print(f"merged / policy step time: {rows[1]['step_s'] / rows[0]['step_s']:.2f}x; meter on / off: "
          f"{rows[1]['step_s'] / rows[2]['step_s']:.3f}x"
          + (f"; merged / {against}: {rows[1]['step_s'] / rows[3]['step_s']:.2f}x" if against else ""))
    if opts.get("scaling") == "False":
        return rows
    print("\nstep time against G and max_new_tokens (engine=merged):")
    for g in (8, 16, 32):
        for n in (48, 96):
            rows.append(run(f"G={g} max_new_tokens={n}", ["--engine=merged", f"--group_size={g}",
                                                           f"--max_new_tokens={n}"]))
    return rows


def load():
    """Load the cpu planner twice with a fresh, empty cache folder: the first load converts the GGUF weights, the
    second must skip that."""
    import transformers, peft  # noqa: F401  (imports are not part of a load)
    with tempfile.TemporaryDirectory(prefix="imageedit-cache-") as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        for name in ("first", "second"):
            t0 = time.perf_counter()
            load_planner("cpu")
            print(f"{name} load: {time.perf_counter() - t0:.1f}s")


def seeds(*run_dirs):
    """Held-out scores of several runs of train.py (one per seed): mean +- std per stage, and the GRPO gain."""
    stages = {"eval zero-shot": "base, zero-shot", "eval cold start": "after cold start", "eval": "after GRPO"}
    keys = ["format", "f1_action", "f1_subject", "f1_goal", "f1", "reward"]
    runs = []
    for d in run_dirs:
        rows = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"))]
        runs.append({name: [r for r in rows if r["phase"] == phase][-1] for phase, name in stages.items()})
    print("| stage | format | F1 action | F1 subject | F1 goal | F1 mean | reward |\n|---|---|---|---|---|---|---|")
    for name in stages.values():
        cells = [[r[name][k] for r in runs] for k in keys]
        print(f"| {name} | " + " | ".join(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" for v in cells) + " |")
    print("\n| run | F1 mean after cold start | F1 mean after GRPO | gain |\n|---|---|---|---|")
    gains = [r["after GRPO"]["f1"] - r["after cold start"]["f1"] for r in runs]
    for d, r, g in zip(run_dirs, runs, gains):
        print(f"| {d} | {r['after cold start']['f1']:.3f} | {r['after GRPO']['f1']:.3f} | {g:+.3f} |")
    print(f"| mean ± std | | | {statistics.mean(gains):+.3f} ± {statistics.stdev(gains):.3f} |")


def coldstart(*argv):
    """How much a supervised start alone learns: coldstart.sft on the first sft_n train requests (past train.py's limit
    of 10% of train_n: this measures capacity, it is not a training recipe), then the held-out scores. --key=value are
    Config fields; --system=FILE replaces the planner's system prompt with a file's text."""
    import coldstart
    import rollout
    import train
    argv = list(argv)
    for a in [a for a in argv if a.startswith("--system=")]:
        argv.remove(a)
        rollout.build_prompt.__defaults__ = (None, Path(a.split("=", 1)[1]).read_text().strip())
    cfg = train.parse_args([a for a in argv if not a.startswith("--sft_n=")])
    n = next((int(a.split("=")[1]) for a in argv if a.startswith("--sft_n=")), cfg.sft_n)
    cfg.train_n = max(cfg.train_n, n)
    torch.manual_seed(cfg.seed)
    test = load_requests("", "test", cfg.eval_n, seed=0)
    requests = load_requests("", "train", cfg.train_n, seed=cfg.seed)[:n]
    describe_requests(test + requests)
    device, dtype, _ = memory.pick_device(cfg.device, cfg.dtype)
    planner, t0 = train.load_policy(cfg, device, dtype), time.time()
    coldstart.sft(planner, requests, cfg)
    scores, _ = train.evaluate(planner, test, cfg)
    print(f"cold start on {n} requests, {cfg.sft_steps} steps of {cfg.sft_batch} in {time.time() - t0:.0f}s: "
          + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    return scores


def edit(adapter=None, request="make his face brighter and blur the background strongly"):
    """Run edit.py as a user does on the 512x512 astronaut: first with an empty cache folder (the GGUF conversion
    and the dequantized copy are built), then 5 times more (warm: only imports, loads and the work)."""
    import subprocess
    with tempfile.TemporaryDirectory(prefix="imageedit-bench-") as tmp:
        photo = os.path.join(tmp, "astronaut.png")
        builtin_image("astronaut", 512).save(photo)
        env = {**os.environ, "XDG_CACHE_HOME": os.path.join(tmp, "cache")}
        cmd = [sys.executable, "edit.py", photo, request, "--force"] + (["--adapter", adapter] if adapter else [])
        warm = []
        for name in ["cold"] + ["warm"] * 5:
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            warm += [wall] if name == "warm" else []
            lines = [x for x in out.stdout.splitlines() if x.startswith(("planner output", "  step", "wrote"))]
            print(f"{name}: {wall:.1f}s wall, exit {out.returncode}\n  " + "\n  ".join(lines or [out.stderr[-300:]]))
        print(f"warm: median {statistics.median(warm):.1f}s, min {min(warm):.1f}s, max {max(warm):.1f}s")


def sequencer(n=40):
    """How the zero-shot sequencing model (SmolLM2 base, adapter off) orders the test split's multi-edit plans:
    how often its answer is usable, and how often it respects the stage order the rules encode."""
    planner = load_planner("cpu", dequantized=True)
    plans = [s for s in make_split("test", 200) if len(s["action"]) > 1][:n]
    used = staged = 0
    t0 = time.perf_counter()
    for s in plans:
        steps, how = sequence(s, planner)
        used += how.startswith("model")
        stages = [STAGE[x.action] for x in steps]
        staged += stages == sorted(stages)
    print(f"{len(plans)} plans: model answer usable {used}, stage order respected {staged} (rules: {len(plans)}), "
          f"{(time.perf_counter() - t0) / len(plans):.2f}s per plan")


def outcome(adapter=None, groups=10):
    """Scoring time of the outcome reward per group of 8 plans on 256x256 images. The groups are real: the cpu
    planner (with `adapter`, default the newest under runs/) samples 8 plans at temperature 0.8 for each of
    `groups` held-out requests, as in training. Targets and gold masks are built first (once per image in
    training); then each group is scored by a fresh scorer without any cache, and by one scorer with its caches,
    in training order."""
    adapter = adapter or newest_adapter(preset="cpu")
    planner = load_planner("cpu", adapter=adapter, dequantized=True)
    tests = describe_requests(load_requests("", "test", groups, seed=0))
    g = torch.Generator().manual_seed(0)
    texts = []
    for s in tests:
        prompt = build_prompt(planner.tok, s["instruction"], s["description"])
        roll = sample_group(planner.policy, [prompt], 8, 48, stop_ids(planner.tok), planner.tok.pad_token_id, 0.8,
                            generator=g)
        texts.append(decode(planner.tok, roll))
    # The trained 135M planner writes many actions the editor lacks, which fail at once; so also time groups that
    # all run: the gold plan and 7 variants of it (other amounts, subjects, one item dropped).
    runnable = [[format_plan(*v) for v in _variants(s)] for s in tests]
    for label, sets in (("sampled", texts), ("runnable", runnable)):
        cached = Outcome()
        for s in tests:
            cached._image(s)  # targets and gold masks: once per image, before the timing, as in training
        times, ran = {"no cache": [], "cache": []}, 0
        for s, group in zip(tests, sets):
            fresh = Outcome(cache_size=0)
            fresh.images = cached.images
            for name, scorer in (("no cache", fresh), ("cache", cached)):
                t0 = time.perf_counter()
                _, info = scorer(group, [s] * len(group))
                times[name].append(time.perf_counter() - t0)
            ran += int(((info["parsed"] > 0) & (info["failed"] == 0)).sum())
        print(f"{label} groups: {sum(len(set(g)) for g in sets)} distinct plans of {8 * len(sets)}, {ran} carried "
              f"out; counts {dict(cached.counts)}")
        for name, ts in times.items():
            print(f"  {name:>8}: median {statistics.median(ts):.2f}s per group of 8, mean {statistics.mean(ts):.2f}s, "
                  f"max {max(ts):.2f}s")


def _variants(s):
    """8 plans for a request: its gold plan and 7 near misses (amounts, subjects, a dropped item)."""
    gold = [list(s[f]) for f in ("action", "subject", "goal")]
    out = [gold]
    for amount in ("slightly", "moderately", "strongly"):
        out.append([gold[0], gold[1], [amount if g in ("slightly", "moderately", "strongly") else g for g in gold[2]]])
    for subject in ("whole image", "background", "face"):
        out.append([gold[0], [subject] + gold[1][1:], gold[2]])
    out.append([x[:1] for x in gold] if len(gold[0]) > 1 else [gold[0], ["center"], gold[2]])
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["outcome"]:
        sys.exit(outcome(*sys.argv[2:]))
    if sys.argv[1:2] == ["step"]:
        step(*sys.argv[2:])
        sys.exit()
    if sys.argv[1:2] == ["load"]:
        sys.exit(load())
    if sys.argv[1:2] == ["edit"]:
        sys.exit(edit(*sys.argv[2:]))
    if sys.argv[1:2] == ["sequencer"]:
        sys.exit(sequencer())
    if sys.argv[1:2] == ["coldstart"]:
        coldstart(*sys.argv[2:])
        sys.exit()
    if sys.argv[1:2] == ["seeds"]:
        sys.exit(seeds(*sys.argv[2:]))
    kw = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    main(**{k: (v if k == "preset" else int(v)) for k, v in kw.items()})
