"""
Rewards for the decomposition agent.

The paper's reward is rule-based and never looks at the edited image:

    format   1 if <action>, <subject> and <goal> are each present once, in that order, non-empty,
             with the same number of ';'-separated items; else 0
    F1       per field (action, subject, goal), against the gold labels
    reward   the paper does not say how the four parts are combined; we take their mean, so reward is in [0, 1]

F1 is computed over the *multiset* of normalised items of a field (order-free: the sequencing agent decides the
order later), so a duplicated item only counts as often as it appears in the gold list. Items are normalised
(lower case, articles and punctuation stripped, synonyms mapped to canonical words) before matching. When the
format is broken we still score whatever tags could be read: a small model gets partial credit while it learns
the format, but it never gets the format point.

Every reward has one shape: a function `(completions, samples) -> (rewards (N,), info)` that scores a whole batch
in one call, on the CPU; `info` maps names to tensors for the log, (N,) per completion or 0-d batch totals.

The outcome reward (`Outcome`, below) closes the loop the paper leaves open: it runs each plan through the agents
and scores the edited image against the target image, the pixels that should not change, and a no-reference quality
score. `Judge` scores the same edited images with the local VLM judge instead (vlm.judge: completion, quality,
preservation, as the paper's GPT-4o judges do; VLM planners only). `make_reward(cfg, planner)` builds the one that
the config's `reward` names: paper, edits, outcome, both or judge.
"""
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import agents
import editor
import regions
import vlm
from data import load_image, sample_image
from plan import FIELDS, edit_f1, f1, format_plan, normalize, parse  # noqa: F401  (format_plan: tests)

def paper_rewards(completions, golds):
    """Score a batch. completions: list[str] (N,); golds: list of dicts with 'action', 'subject', 'goal' lists (N,).
    Returns (rewards (N,), info) where info maps 'format', 'f1_action', 'f1_subject', 'f1_goal', 'f1' and
    'edit_f1' (plan.edit_f1) and 'edit_count' (fewer edits / more edits of plan and gold; both 0 for a plan that
    does not parse) to (N,)."""
    assert len(completions) == len(golds), f"{len(completions)} completions but {len(golds)} labels"
    rows = []
    for text, gold in zip(completions, golds):
        p = parse(text)
        gold = {f: [normalize(x, f) for x in gold[f]] for f in FIELDS}
        fs = [f1(p[f], gold[f]) for f in FIELDS]
        n, k = len(p["action"]), len(gold["action"])
        rows.append([float(p["ok"])] + fs + ([edit_f1(p, gold), min(n, k) / max(n, k)] if p["ok"] else [0.0, 0.0]))
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)  # (N, 6): format, f1 x 3, edit F1, edit count
    info = {"format": t[:, 0], "f1_action": t[:, 1], "f1_subject": t[:, 2], "f1_goal": t[:, 3],
            "f1": t[:, 1:4].mean(1), "edit_f1": t[:, 4], "edit_count": t[:, 5]}
    return t[:, :4].mean(1), info


def edit_rewards(completions, golds):
    """The edit-level reward: (format + 3 x edit F1 + edit count) / 5. The paper's three per-field F1s are replaced
    by one F1 over whole edits (plan.edit_f1), and the count term pays for writing as many edits as the request
    has: under any F1 alone, a planner unsure of a request's second edit scores more by leaving it out than by
    guessing it wrong, and GRPO trained the paper's planner to write one edit for every request. With the count
    term a wrong guess costs nothing on average and a half-right one pays. Returns (rewards (N,), info) with
    paper_rewards' parts and the paper's reward under 'paper_reward'."""
    paper, info = paper_rewards(completions, golds)
    return (info["format"] + 3 * info["edit_f1"] + info["edit_count"]) / 5, {**info, "paper_reward": paper}


# ----------------------------------------------------------------------------------------------------------------
# The outcome reward: run the plan and look at the picture.
#
# For each completion: parse it, order its items (agents.sequence, rules), run them through the region agents and
# the CPU editor on the request's image at `size` pixels, and score the edited image against
#   target    how much of the way from the source to the target image the edit went: 1 - |edit - target| /
#             |source - target| (mean absolute difference), clipped to [0, 1]; 0 for no edit or a wrong one.
#             The target is the dataset's, or, for the built-in data, the gold plan run by the same agents.
#   preserve  the share of pixels outside the gold regions (grown by the editor's feather margin) that moved by at
#             most PRESERVE_TOL grey levels. Not scored when the gold plan is geometry or covers nearly everything.
#   quality   1 - BRISQUE / 100 (OpenCV's no-reference score: 0 is pristine, 100 is bad). Needs the model files of
#             Debian's opencv-data package (`make install` unpacks them into .venv); without them it is skipped and
#             the first call says so.
# outcome = target x the weighted mean of (1, preserve, quality) over the parts scored (the weighted mean of preserve
# and quality alone where there is no target). The product matters: with a plain weighted mean, a GRPO run learned
# to answer every request with a small edit that changes nearly nothing, which keeps pixels and quality and was
# worth 0.3 whatever the request asked. A completion that does not parse, or that has a step an agent
# fails on (an action the editor lacks, an agent raising), gets 0, the minimum; failures are counted, never raised.
#
# Caching: the G samples of a group often share plans or their first steps. Every executed (image, step prefix) is
# kept (LRU, `cache_size` images of 256x256: 200 MB at most), so a prefix runs once however many samples share it,
# across groups and training steps; each distinct plan of a batch is scored once. Regions are found on the image
# after the plan's geometry steps and cached per (image, geometry, subject). Source images, targets and gold masks
# are cached per request.

PRESERVE_TOL = 4
BRISQUE_FILES = ("brisque_model_live.yml", "brisque_range_live.yml")


def brisque_dir():
    """Where the BRISQUE model files are: $BRISQUE_DIR, this Python's share/ (make install), or the system's."""
    for d in (os.environ.get("BRISQUE_DIR"), Path(sys.prefix) / "share/opencv4/quality", "/usr/share/opencv4/quality"):
        if d and all((Path(d) / f).exists() for f in BRISQUE_FILES):
            return Path(d)
    return None


class Outcome:
    """Scores completions by the images they produce. `weights`: (target, preserve, quality)."""

    def __init__(self, size=256, weights=(0.6, 0.3, 0.1), cache_size=1024, quality=True):
        self.size, self.weights, self.cache_size = size, weights, cache_size  # cache_size 0: no caching at all
        self.runs = {}       # (image key, ((action, subject, goal), ...)) -> (array, error or None); insertion = LRU
        self.masks = {}      # (image key, geometry steps run, subject) -> Region
        self.images = {}     # (image key, gold plan) -> (source, target, gold mask or None), or None: no target
        self.counts = Counter()  # executed / reused steps, failed steps, agent exceptions
        self.brisque = None
        d = brisque_dir() if quality else None
        if d is not None:
            import cv2
            self.brisque = cv2.quality.QualityBRISQUE_create(*(str(d / f) for f in BRISQUE_FILES))
        elif quality:
            print("outcome reward: no BRISQUE model files (Debian's opencv-data; `make install` unpacks them), "
                  "so the quality part is skipped")

    def _key(self, s):
        return s.get("image_path") or s["image"]

    def _request(self, s):
        """A request's image and gold plan: what its target depends on."""
        return (self._key(s), tuple(s["action"]), tuple(s["subject"]), tuple(s["goal"]))

    def _execute(self, key, image, steps):
        """The image after `steps` and the first error (or None); every prefix is run once and cached.
        Regions are found on the image after the plan's geometry steps (the rules put those first), so a subject's
        mask is found once per image and frame, whatever tone edits came before it."""
        err, done, frame, framed = None, (), (), image

        def find(_, subject):
            k = (key, frame, subject)
            if k in self.masks:
                return self.masks[k]
            region = regions.find(framed, subject)
            if self.cache_size:
                if len(self.masks) >= self.cache_size:
                    self.masks.clear()
                self.masks[k] = region
            return region
        for step in steps:
            done += ((step.action, step.subject, step.goal),)
            hit = self.runs.pop((key, done), None)
            if hit is None:
                out, trace = agents.run_steps(image, [step], work_size=self.size, find=find)
                hit = (out, trace[0].get("error"))
                self.counts["steps_run"] += 1
                self.counts["agent_errors"] += bool(hit[1]) and not hit[1].startswith("EditError")
                if self.runs and len(self.runs) >= self.cache_size:
                    self.runs.pop(next(iter(self.runs)))
            else:
                self.counts["steps_reused"] += 1
            if self.cache_size:
                self.runs[(key, done)] = hit  # (re-)inserted: most recently used last
            image, err = hit[0], err or hit[1]
            if step.action in editor.GEOMETRY:
                frame, framed = frame + done[-1:], regions.downscale(image, self.size)
        return image, err

    def source(self, s):
        """A sample's image as the outcome reward edits it: RGB uint8, at most `size` pixels a side."""
        return regions.downscale(np.asarray(sample_image(s, self.size)), self.size)

    def _image(self, s):
        """(source, target, gold mask) of a sample's image, computed once per image and gold plan; None when the
        agents cannot carry out the gold plan itself (there is no target to compare with)."""
        key = self._request(s)
        if key in self.images:
            return self.images[key]
        src = self.source(s)
        gold, _ = agents.sequence({f: list(s[f]) for f in FIELDS})
        if s.get("target_path"):
            tgt = np.asarray(load_image(s["target_path"]).resize((src.shape[1], src.shape[0])))
        else:
            tgt, err = self._execute(key[0], src, gold)
            if err:
                self.images[key] = None
                return None
        mask = None
        if not any(g.action in editor.WHOLE_FRAME for g in gold):
            m = np.zeros(src.shape[:2], np.float32)
            for g in gold:
                m = np.maximum(m, regions.find(src, g.subject).mask)
            import cv2
            k = 2 * editor.margin(src.shape) + 1
            grown = cv2.dilate((m > 0.01).astype(np.uint8), np.ones((k, k), np.uint8)) > 0
            mask = None if grown.mean() > 0.95 else grown
        self.images[key] = (src, tgt, mask)
        return self.images[key]

    def score(self, edited, src, tgt, mask):
        """{'target', 'preserve', 'quality'} of one edited image; a part that does not apply is absent."""
        import cv2
        out = {}
        e = edited if edited.shape == tgt.shape else cv2.resize(edited, (tgt.shape[1], tgt.shape[0]),
                                                               interpolation=cv2.INTER_AREA)
        s = src if src.shape == tgt.shape else cv2.resize(src, (tgt.shape[1], tgt.shape[0]),
                                                          interpolation=cv2.INTER_AREA)
        gap = np.abs(s.astype(np.int16) - tgt).mean()
        out["target"] = float(np.clip(1 - np.abs(e.astype(np.int16) - tgt).mean() / max(gap, 1.0), 0, 1))
        if mask is not None:
            same = edited.shape == src.shape
            moved = np.abs(edited.astype(np.int16) - src).max(-1) if same else None
            out["preserve"] = float((moved[~mask] <= PRESERVE_TOL).mean()) if same else 0.0
        if self.brisque is not None:
            out["quality"] = float(np.clip(1 - self.brisque.compute(edited)[0] / 100, 0, 1))
        return out

    def __call__(self, completions, samples):
        """(rewards (N,), info): info maps 'outcome', 'target', 'preserve', 'quality' (NaN where not scored),
        'failed' (1: an agent failed on a step), 'parsed' and 'scorable' (0: the agents cannot run the gold plan, so
        there is no target; such a request gets 0 whatever the plan) to (N,) tensors."""
        assert len(completions) == len(samples), f"{len(completions)} completions but {len(samples)} samples"
        names, rows, scored = ("target", "preserve", "quality"), [], {}
        for text, s in zip(completions, samples):
            p = parse(text)
            gold = self._image(s)
            row = {"parsed": float(p["ok"]), "failed": 0.0, "scorable": float(gold is not None)}
            if p["ok"] and gold is not None:
                steps, _ = agents.sequence(p)
                key = (self._request(s), tuple((x.action, x.subject, x.goal) for x in steps))
                if key in scored:  # the same plan for the same request earlier in this batch: scored once
                    result = scored[key]
                else:
                    edited, err = self._execute(self._key(s), gold[0], steps)
                    self.counts["failed_plans"] += bool(err)
                    result = None if err else self.score(edited, *gold)
                    if self.cache_size:
                        scored[key] = result
                row["failed"] = float(result is None)
                row.update(result or {})
            parts = [(w, 1.0 if n == "target" else row[n]) for w, n in zip(self.weights, names) if n in row and w > 0]
            ok = row["parsed"] and not row["failed"] and parts
            mean = sum(w * v for w, v in parts) / sum(w for w, _ in parts) if ok else 0.0
            row["outcome"] = mean * row.get("target", 1.0)  # gated: no credit for keeping pixels without the edit
            rows.append(row)
        info = {k: torch.tensor([r.get(k, float("nan")) for r in rows])
                for k in ("outcome", *names, "failed", "parsed", "scorable")}
        return info["outcome"].clone(), info


class Judge:
    """(rewards (N,), info) from the local judge (vlm.judge, the planner's base with its adapter off): each parsed
    plan is run by the agents on the sample's image at outcome.size (with the outcome reward's cache), and the judge
    scores completion, quality and preservation from 0 to 10; the reward is their mean / 10. A plan that does not
    parse or whose run fails gets 0 and is counted. Needs a VLM planner (gpu24, tiny_vl). No gold labels or targets
    are used: a dataset of bare requests can be trained on. Each distinct (request, ordered plan) of the batch is
    judged once and its score shared: identical plans get identical rewards (a bf16 judge scoring the same plan in
    two batches differs in the last bits, which group normalisation would blow up)."""

    def __init__(self, planner, outcome):
        self.planner, self.outcome = planner, outcome

    def __call__(self, completions, samples):
        outcome, n = self.outcome, len(completions)
        jobs, sources, info = [], {}, {k: torch.full((n,), float("nan")) for k in vlm.QUESTIONS}
        owners, seen = [], {}  # owners: (sample, job) pairs; seen: (image, request, plan) -> its job
        info.update(parsed=torch.zeros(n), failed=torch.zeros(n))
        for i, (text, s) in enumerate(zip(completions, samples)):
            p = parse(text)
            info["parsed"][i] = float(p["ok"])
            if not p["ok"]:
                continue
            steps, _ = agents.sequence(p)
            key = outcome._key(s)
            plan = (key, s["instruction"], tuple((x.action, x.subject, x.goal) for x in steps))
            if plan in seen:
                owners.append((i, seen[plan]))
                continue
            if key not in sources:  # once per image, not once per sample of its group
                sources[key] = outcome.source(s)
            edited, err = outcome._execute(key, sources[key], steps)
            seen[plan] = None if err else len(jobs)
            owners.append((i, seen[plan]))
            if not err:
                jobs.append((s["instruction"], Image.fromarray(sources[key]), Image.fromarray(edited)))
        rewards = torch.zeros(n)
        info["failed"][[i for i, j in owners if j is None]] = 1.0
        owners = [(i, j) for i, j in owners if j is not None]
        if jobs:
            scores = vlm.judge(self.planner, *zip(*jobs))  # (n, 3): one row per distinct plan
            rows, idx = torch.tensor([i for i, _ in owners]), torch.tensor([j for _, j in owners])
            rewards[rows] = scores[idx].mean(1) / 10
            for k, name in enumerate(vlm.QUESTIONS):
                info[name][rows] = scores[idx, k]
        return rewards, info


def make_reward(cfg, planner=None):
    """The reward that cfg.reward names, as one function (completions, samples) -> (rewards (N,), info): "paper",
    "edits" (edit_rewards),
    "outcome" (Outcome at cfg.outcome_size with cfg.outcome_weights), "both" (cfg.outcome_mix * outcome +
    (1 - cfg.outcome_mix) * paper) or "judge" (Judge; needs the VLM `planner`). The paper's parts (format, F1s)
    are always in info, so every run logs them; the others add their parts, the agents' step counts of the batch
    and their seconds."""
    if cfg.reward == "paper":
        return paper_rewards
    if cfg.reward == "edits":
        return edit_rewards
    outcome = Outcome(cfg.outcome_size, cfg.outcome_weights, quality=cfg.reward != "judge")
    scorer = Judge(planner, outcome) if cfg.reward == "judge" else outcome
    mix = cfg.outcome_mix if cfg.reward == "both" else 1.0

    def reward(completions, samples):
        t, counts = time.time(), dict(outcome.counts)
        paper, info = paper_rewards(completions, samples)
        rewards, parts = scorer(completions, samples)
        info.update({k: v for k, v in parts.items() if not v.isnan().all()}, paper_reward=paper)
        info.update({k: torch.tensor(float(outcome.counts[k] - counts.get(k, 0)))
                     for k in ("agent_errors", "steps_run", "steps_reused")})
        info["outcome_seconds"] = torch.tensor(time.time() - t)
        return mix * rewards + (1 - mix) * paper, info
    return reward
