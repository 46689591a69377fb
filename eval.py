"""
The paper's comparison on our data: each system plans the held-out requests, the agents carry the plans out, and
the edited images are scored against the targets (reward.Outcome) next to the paper's format and F1 numbers.

    python eval.py                          # every cpu run under runs/, grouped by its reward; writes runs/eval/
    python eval.py --n=40 --root=runs --out=runs/eval --examples=4
    python eval.py --free --out=runs/eval_free  # plans decoded without the plan grammar
    python eval.py --phrasings runs/gram0 runs/gram1   # does a run generalise to phrasings it never saw?

Rows:
    keyword baseline      a hand-written keyword parser of the request (the "hand-crafted pipeline"), then the
                          same sequencing, region and editing agents
    cold start            the planner after the format cold start only (one cold_start/ adapter per seed)
    GRPO, <r> reward      the planner after GRPO with reward r (paper, outcome, both): each run's adapter/;
                          ", free rollouts" when the run sampled without the plan grammar (constrain=False)
Every planner decodes greedily under the plan grammar (rollout.PlanGrammar), as edit.py does, unless --free.
Trained rows are the mean and spread (population std) over their seeds, one run folder per seed. Runs are those
whose config.json has the cpu preset with the perception text on (the prompts the planner was trained with).

Metrics, on the held-out split at 256 px (see reward.py): target similarity (instruction following: the share of
the way from the source to the target image), preservation (pixels outside the gold regions left alone), quality
(1 - BRISQUE / 100), failed (plans that do not parse or that an agent cannot carry out; they score 0 on target
similarity and are left out of preservation and quality), plus format, F1 and the paper's reward. Target
similarity is also split by requests of one edit and of two or more, next to the mean number of edits in the
plans that parse (the held-out gold plans have 1.65).
Writes <out>/table.md, <out>/results.json (every plan of every system) and <out>/examples.png; each adapter's
plans are kept in <out>/plans/ and reused while the adapter is unchanged.
"""
import argparse
import json
import re
import statistics
import time
from pathlib import Path

import agents
import editor
from agents import greedy_plans
from data import REGIONS, grpo_batch, image_names, image_subjects
from phrasings import load_requests
from planner import load_planner
from regions import describe_requests
from reward import Outcome, format_plan, paper_rewards, parse
from rollout import plan_grammar

ROWS = ["keyword baseline", "cold start", *(f"GRPO, {r} reward{how}" for how in (", free rollouts", "")
                                            for r in ("paper", "edits", "outcome", "both"))]
COLUMNS = [("target", "target sim."), ("target_1", "target, 1 edit"), ("target_2", "target, 2+ edits"),
           ("edits", "edits/plan"), ("preserve", "preservation"), ("quality", "quality"), ("failed", "failed"),
           ("format", "format"), ("f1_action", "F1 action"), ("f1", "F1"), ("edit_f1", "edit F1"),
           ("paper", "paper reward")]

# ----------------------------------------------------------------------------------------------------------------
# The keyword baseline: what a person writes in an afternoon, without a model. Each clause of the request gets the
# first action whose pattern matches, the longest known subject it names (else the whole image) and a goal read
# from its words.

ACTION_PATTERNS = [  # the editor's operations and their everyday names, nothing mined from the test phrasings;
    # order matters: "desaturate" before "saturate", background swaps before colour changes
    ("replace background", r"\b(replace|swap|change)\b.*\bbackground\b"),
    ("grayscale", r"gr[ae]y ?scale|black and white|monochrome"),
    ("sepia", r"sepia"),
    ("desaturate", r"desaturat|less saturat|muted"),
    ("saturate", r"saturat|vivid"),
    ("decrease contrast", r"(decrease|reduce|lower|less) (the )?contrast"),
    ("increase contrast", r"contrast"),
    ("darken", r"dark(en|er)"),
    ("brighten", r"bright|lighten"),
    ("warm", r"warm"),
    ("cool", r"\bcool"),
    ("remove", r"remove|delete|erase"),
    ("recolor", r"recolou?r|colou?r|paint"),
    ("sharpen", r"sharp"),
    ("blur", r"blur"),
    ("denoise", r"nois"),
    ("crop", r"crop"),
    ("rotate", r"rotat"),
    ("flip", r"flip|mirror"),
    ("vignette", r"vignette"),
    ("add grain", r"grain"),
    ("pixelate", r"pixel"),
]
AMOUNTS = [("strongly", r"\b(much|far|way|a lot|heavily|strong(ly)?|dramatic(ally)?|heavy)\b"),
           ("slightly", r"\b(a little|a bit|a touch|slightly|subtle|light|faint)\b")]


def _subjects():
    names = {s for m in image_names() for s in image_subjects(m)} | set(REGIONS) | {"background", "text"}
    return sorted(names, key=len, reverse=True)


def keyword_plan(instruction):
    """The keyword baseline's plan for a request, as a completion in the planner's tag format."""
    text = instruction.lower().replace("black and white", "black-and-white")
    clauses = [c for c in re.split(r"[,;.]|\band\b|\bthen\b|\balso\b", text) if c.strip()]
    subjects, plan = _subjects(), ([], [], [])
    for clause in clauses:
        clause = clause.replace("black-and-white", "black and white")
        action = next((a for a, p in ACTION_PATTERNS if re.search(p, clause)), None)
        if action is None:
            continue
        subject = next((s for s in subjects if re.search(rf"\b{re.escape(s)}\b", clause)), "whole image")
        if action == "replace background":
            subject = "background"
        if action in ("grayscale", "sepia", "remove"):
            goal = "full"
        elif action in ("recolor", "replace background"):
            goal = next((c for c in editor.COLORS if re.search(rf"\b{c}\b", clause) and c not in subject),
                        "blurred" if "blur" in clause else "red")
        elif action == "crop":
            goal = (re.findall(r"\d+:\d+", clause) or ["square"])[0]
        elif action == "rotate":
            way = next((w for w in ("counterclockwise", "clockwise") if w in clause), "")
            goal = (re.findall(r"\d+", clause) or ["90"])[0] + " degrees" + (f" {way}" if way else "")
        elif action == "flip":
            goal = "vertical" if re.search(r"vertical|top to bottom", clause) else "horizontal"
        else:
            goal = next((g for g, p in AMOUNTS if re.search(p, clause)), "moderately")
        for items, x in zip(plan, (action, subject, goal)):
            items.append(x)
    return format_plan(*plan) if plan[0] else "<action></action><subject></subject><goal></goal>"


# ----------------------------------------------------------------------------------------------------------------

def find_runs(root):
    """{row name: [(run folder, adapter folder), ...]} for the finished cpu runs under root trained with the
    perception text."""
    rows, seeds = {}, set()
    for cfg_path in sorted(Path(root).glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        run = cfg_path.parent
        logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").exists() else []
        finished = any(r["phase"] == "eval" and r["step"] == cfg.get("steps") for r in logged)
        if cfg.get("preset") != "cpu" or not cfg.get("describe") or not finished:
            continue  # another preset, prompts without the perception line, or a run still going
        how = "" if cfg.get("constrain") else ", free rollouts"  # sampled with or without the plan grammar
        rows.setdefault(f"GRPO, {cfg.get('reward', 'paper')} reward{how}", []).append((run, run / "adapter"))
        if (run / "cold_start").is_dir() and cfg["seed"] not in seeds:  # the cold start depends on the seed only
            seeds.add(cfg["seed"])
            rows.setdefault("cold start", []).append((run, run / "cold_start"))
    return rows


def plans(adapter, samples, cache_dir, constrain=True):
    """Greedy plans of the cpu planner with this adapter, batched, as in train.py's evaluation; `constrain`: with
    the plan grammar. Kept in cache_dir and reused while the adapter file, the requests and `constrain` are
    unchanged, so a rerun only plans for new runs."""
    weights = Path(adapter) / "adapter_model.safetensors"
    key = {"adapter": str(Path(adapter).resolve()), "mtime": weights.stat().st_mtime,
           "requests": [s["instruction"] for s in samples], "constrain": constrain}
    name = re.sub(r"[^\w.-]+", "_", key["adapter"]).strip("_") + ("" if constrain else "_free")
    cached = Path(cache_dir) / (name + ".json")
    if cached.exists() and {k: v for k, v in json.loads(cached.read_text()).items() if k != "plans"} == key:
        return json.loads(cached.read_text())["plans"]
    planner = load_planner("cpu", adapter=adapter, dequantized=True)
    texts = greedy_plans(planner, key["requests"], 48, 25, [s["description"] for s in samples],
                         plan_grammar(planner.tok) if constrain else None)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({**key, "plans": texts}))
    return texts


def score(texts, samples, outcome):
    """Mean metrics of one system's plans, and the per-request values."""
    import torch

    paper, info = paper_rewards(texts, samples)
    _, out = outcome(texts, samples)
    usable = out["scorable"].bool()
    done = usable & (out["parsed"] > 0) & (out["failed"] == 0)
    target = out["target"].nan_to_num(0.0)
    multi = torch.tensor([len(s["action"]) > 1 for s in samples])
    edits = [len(p["action"]) for p in map(parse, texts) if p["ok"]]
    means = {"target": target[usable].mean(), "target_1": target[usable & ~multi].mean(),
             "target_2": target[usable & multi].mean(), "edits": statistics.mean(edits) if edits else float("nan"),
             "failed": 1 - done[usable].float().mean(),
             "preserve": out["preserve"][done].nanmean(), "quality": out["quality"][done].nanmean(),
             "format": info["format"].mean(), "f1_action": info["f1_action"].mean(), "f1": info["f1"].mean(),
             "edit_f1": info["edit_f1"].mean(), "paper": paper.mean()}
    per = [{k: round(v[i].item(), 4) for k, v in {**out, "f1": info["f1"]}.items()} for i in range(len(texts))]
    return {k: round(float(v), 4) if torch.is_tensor(v) else v for k, v in means.items()}, per


def table(results):
    """Markdown: mean ± spread per row over its seeds."""
    head = "| system | seeds | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name in ROWS:
        seeds = results.get(name)
        if not seeds:
            continue
        cells = []
        for k, _ in COLUMNS:
            vals = [s["metrics"][k] for s in seeds if s["metrics"][k] == s["metrics"][k]]  # NaN: not scored
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}")
        lines.append(f"| {name} | {len(seeds) if name != 'keyword baseline' else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def examples_png(path, samples, texts_by_row, outcome, k=4):
    """A grid: one request per row; source, target, then each system's first seed."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    picks = [i for i, s in enumerate(samples) if len(s["action"]) > 1 and outcome._image(s) is not None][:k]
    cols = ["source", "target"] + list(texts_by_row)
    side, cap, font = 220, 34, ImageFont.load_default(size=12)
    pic = Image.new("RGB", (side * len(cols), 24 + len(picks) * (side + cap)), "white")
    d = ImageDraw.Draw(pic)
    for j, c in enumerate(cols):
        d.text((j * side + 4, 6), c, "black", font)
    for r, i in enumerate(picks):
        s, y = samples[i], 24 + r * (side + cap)
        src, tgt, _ = outcome._image(s)
        cells = [src, tgt]
        for texts in texts_by_row.values():
            p = parse(texts[i])
            img, err = (outcome._execute(outcome._key(s), src, agents.sequence(p)[0]) if p["ok"] else (None, "no plan"))
            cells.append(None if err else img)
        for j, im in enumerate(cells):
            if im is None:
                d.text((j * side + 60, y + side // 2), "failed", "red", font)
            else:
                thumb = Image.fromarray(np.ascontiguousarray(im))
                thumb.thumbnail((side - 4, side - 4))  # keeps the aspect ratio: a crop shows as one
                pic.paste(thumb, (j * side + 2, y))
        d.text((4, y + side + 2), s["instruction"][:200], "black", font)
    pic.save(path)


def phrasing_sets(run, n):
    """Three sets of n labelled requests for a run folder: train requests its GRPO steps sampled, train requests it
    never saw (not sampled, not in the cold start; same phrasing templates), and held-out requests (templates and
    action combinations of the test split only)."""
    missing = [f for f in ("config.json", "cold_start", "adapter") if not (Path(run) / f).exists()]
    if missing:
        raise SystemExit(f"error: {run} is not a finished run folder (no {', '.join(missing)})")
    cfg = json.loads((Path(run) / "config.json").read_text())
    train = load_requests("", "train", cfg["train_n"], seed=cfg["seed"])
    seed, B = cfg["seed"], cfg["batch_prompts"]
    seen = {id(s) for step in range(cfg["steps"]) for s in grpo_batch(train, seed, step, B)}
    # dynamic sampling's rounds drew at most B more each (a draw of fewer is a prefix of that one); any request
    # with a text the run saw, in GRPO or in the cold start, is not "unseen"
    maybe = {id(s) for step in range(cfg["steps"]) for r in range(1, cfg.get("resample", 0) + 1)
             for s in grpo_batch(train, seed, step, B, r)}
    texts = {s["instruction"] for s in train if id(s) in seen | maybe}
    texts |= {s["instruction"] for s in train[:cfg["sft_n"]]}
    sets = {"seen train": [s for s in train if id(s) in seen][:n],
            "unseen train": [s for s in train[cfg["sft_n"]:] if s["instruction"] not in texts][:n],
            "held-out": load_requests("", "test", n, seed=0)}
    describe_requests([s for v in sets.values() for s in v])  # in place, each image described once for all sets
    return sets


def phrasing_gap(runs, n, cache_dir):
    """Action F1 and mean F1 of each run's cold start and GRPO adapter on phrasing_sets: is what GRPO learns the
    request words it trained on, or the edits? Returns {run: {adapter: {set: (f1_action, f1)}}} and prints it."""
    out = {}
    for run in map(Path, runs):
        sets = phrasing_sets(run, n)
        for adapter in ("cold_start", "adapter"):
            texts = iter(plans(run / adapter, [s for v in sets.values() for s in v], cache_dir))  # one load
            for name, samples in sets.items():
                _, info = paper_rewards([next(texts) for _ in samples], samples)
                f1a, f1 = round(info["f1_action"].mean().item(), 3), round(info["f1"].mean().item(), 3)
                out.setdefault(str(run), {}).setdefault(adapter, {})[name] = (f1a, f1)
                print(f"{str(run):<14} {adapter:<11} {name:<13} n={len(samples)} f1_action={f1a:.3f} f1={f1:.3f}",
                      flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="held-out requests (train.py scores the first 100)")
    ap.add_argument("--root", default="runs", help="where the run folders are")
    ap.add_argument("--out", default="runs/eval", help="where table.md, results.json and examples.png go")
    ap.add_argument("--examples", type=int, default=4, help="requests in examples.png")
    ap.add_argument("--free", action="store_true", help="decode plans without the plan grammar (rollout.PlanGrammar)")
    ap.add_argument("--phrasings", nargs="+", metavar="RUN", help="only compare these runs on train requests they "
                    "sampled, unseen train requests and held-out ones (--n of each)")
    args = ap.parse_args(argv)
    if args.phrasings:
        return phrasing_gap(args.phrasings, args.n, Path(args.out) / "plans")
    test = describe_requests(load_requests("", "test", args.n, seed=0))
    outcome = Outcome()
    systems = find_runs(args.root)
    if not systems:
        print(f"note: no cpu runs with perception text under {args.root}/; only the keyword baseline is scored "
              "(train some with `make train`)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, first = {}, {}
    for name in ROWS:
        for run, adapter in [(None, None)] if name == "keyword baseline" else systems.get(name, []):
            t = time.time()
            texts = [keyword_plan(s["instruction"]) for s in test] if adapter is None else \
                plans(adapter, test, out / "plans", not args.free)
            metrics, per = score(texts, test, outcome)
            results.setdefault(name, []).append({"run": str(run) if run else None, "adapter": str(adapter or ""),
                                                 "metrics": metrics, "plans": texts, "per_request": per})
            first.setdefault(name, texts)
            print(f"{name:<22} {str(run or ''):<18} " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
                  + f"  ({time.time() - t:.0f}s)", flush=True)
    md = table(results)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"n": len(test), "requests": [s["instruction"] for s in test],
                                                  "systems": results}, indent=1))
    examples_png(out / "examples.png", test, first, outcome, args.examples)
    print(f"\n{len(test)} held-out requests, 256 px, cpu preset\n\n{md}\n\nwrote {out}/table.md, results.json, "
          f"examples.png")
    return results


if __name__ == "__main__":
    main()
