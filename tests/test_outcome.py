"""The outcome reward (reward.Outcome), its caches and failures, the outcome run of train.py, and eval.py."""
import json

import numpy as np
import pytest

import agents
import regions
from data import builtin_image
from phrasings import make_split
from reward import Outcome, brisque_dir, format_plan


def plan(*items):
    return format_plan(*(list(x) for x in zip(*items)))


SAMPLE = {"image": "astronaut", "instruction": "blur the background strongly", "action": ["blur"],
          "subject": ["background"], "goal": ["strongly"]}


@pytest.fixture(scope="module")
def scorer():
    return Outcome()


def test_gold_plan_scores_one_and_wrong_plans_less(scorer):
    texts = [plan(("blur", "background", "strongly")),       # the gold plan
             plan(("blur", "background", "slightly")),       # right place, too little
             plan(("blur", "person", "strongly")),           # the wrong region
             plan(("brighten", "whole image", "strongly")),  # the wrong edit
             "blur the background please"]                   # not a plan
    r, info = scorer(texts, [SAMPLE] * len(texts))
    target, preserve = info["target"].tolist(), info["preserve"].tolist()
    assert target[0] == pytest.approx(1.0) and preserve[0] == pytest.approx(1.0)
    assert 0.1 < target[1] < 0.9 and preserve[1] > 0.95          # partway there, the person left alone
    assert target[2] < 0.2 and preserve[2] < 0.5                 # blurred the person: not the target, not preserved
    assert target[3] == 0.0 and preserve[3] < 0.5 and r[3] == 0.0  # no step towards the target: 0, whatever else
    assert r[0] == max(r) and r[0] > r[1] > r[2] and r[4] == 0.0 and info["parsed"].tolist() == [1, 1, 1, 1, 0]


def test_a_dataset_target_file_is_the_target(tmp_path):
    """A sample with target_path is scored against that file, not against its gold plan's result: the target
    file here is the blurred image, so the gold plan (blur) reaches it and doing nothing does not."""
    from PIL import Image
    src, dst = tmp_path / "src.png", tmp_path / "tgt.png"
    builtin_image("astronaut", 256).save(src)
    blurred, _ = agents.run_steps(np.asarray(builtin_image("astronaut", 256)),
                                   [rollout_step("blur", "whole image", "strongly")])
    Image.fromarray(blurred).save(dst)
    sample = {"image_path": str(src), "target_path": str(dst), "instruction": "blur it", "action": ["sharpen"],
              "subject": ["whole image"], "goal": ["slightly"]}  # labels that do not lead to the target
    r, info = Outcome(quality=False)([plan(("blur", "whole image", "strongly")), plan(("sharpen", "whole image",
                                                                                       "slightly"))], [sample] * 2)
    assert info["target"][0] > 0.95 > info["target"][1] and r[0] > r[1]


def rollout_step(action, subject, goal):
    from plan import Step
    return Step(action, subject, goal)


def test_built_in_targets_are_the_gold_plans(scorer):
    """Every scorable test request: its gold plan reaches its target exactly, and changes nothing it should not."""
    samples = make_split("test", 30)
    r, info = scorer([format_plan(s["action"], s["subject"], s["goal"]) for s in samples], samples)
    ok = info["scorable"].bool()
    assert ok.sum() >= 28
    assert info["target"][ok].min() == 1.0 and info["failed"].sum() == 0
    assert info["preserve"][ok].nan_to_num(1.0).min() == 1.0


def test_a_group_runs_each_prefix_once():
    s = Outcome(quality=False)
    gold = s._image(SAMPLE)  # targets first, as in training
    before = dict(s.counts)
    group = [plan(("blur", "background", "strongly"), ("brighten", "face", "slightly"))] * 5 \
        + [plan(("blur", "background", "strongly"))] * 3
    r, _ = s(group, [SAMPLE] * 8)
    # the rules run tone before finishing: "brighten the face", then the blur on top of it (2 new prefixes); the
    # blur alone is the gold plan, already run for the target
    assert gold is not None and s.counts["steps_run"] - before.get("steps_run", 0) == 2
    assert len(set(r[:5].tolist())) == 1 and len(set(r[5:].tolist())) == 1
    s(group, [SAMPLE] * 8)
    assert s.counts["steps_run"] - before.get("steps_run", 0) == 2  # the next group: all from the cache
    fresh = Outcome(quality=False, cache_size=0)
    fresh.images = s.images
    r2, _ = fresh(group, [SAMPLE] * 8)
    assert fresh.counts["steps_run"] == 5 * 2 + 3 and np.allclose(r2, r)  # no cache: every step, same rewards


def test_failing_agents_get_the_minimum_and_are_counted(monkeypatch):
    s = Outcome(quality=False)
    s._image(SAMPLE)
    real = regions.find

    def find(image, subject):
        if subject == "face":
            raise RuntimeError("face detector crashed")
        return real(image, subject)
    monkeypatch.setattr(regions, "find", find)
    texts = [plan(("blur", "background", "strongly"), ("brighten", "face", "slightly")),
             plan(("teleport", "background", "mars")), plan(("blur", "background", "strongly"))]
    r, info = s(texts, [SAMPLE] * 3)
    assert info["failed"].tolist() == [1, 1, 0] and r[:2].tolist() == [0, 0] and r[2] == 1.0
    assert s.counts["agent_errors"] == 1 and s.counts["failed_plans"] == 2  # an unknown action is no agent error


def test_same_plan_on_same_image_is_scored_per_request(scorer):
    """Two requests on one image in one batch: the same plan is right for one and wrong for the other."""
    face = {**SAMPLE, "instruction": "brighten the face", "action": ["brighten"], "subject": ["face"],
            "goal": ["strongly"]}
    text = plan(("blur", "background", "strongly"))
    r, info = scorer([text, text], [SAMPLE, face])
    assert info["target"].tolist()[0] == 1.0 and info["target"].tolist()[1] < 0.1


def test_geometry_and_unscorable_requests(scorer):
    crop = {**SAMPLE, "instruction": "crop it square", "action": ["crop"], "subject": ["whole image"],
            "goal": ["16:9"]}
    r, info = scorer([plan(("crop", "whole image", "16:9")), plan(("crop", "whole image", "4:3"))], [crop] * 2)
    assert info["target"][0] == 1.0 and 0 <= info["target"][1] < 1.0 and info["preserve"].isnan().all()
    no_text = {**SAMPLE, "image": "chelsea", "action": ["remove"], "subject": ["text"], "goal": ["full"]}
    r, info = scorer([plan(("remove", "text", "full"))], [no_text])  # the agents cannot run the gold plan
    assert info["scorable"].tolist() == [0] and r.tolist() == [0]


def test_quality_part_brisque():
    if brisque_dir() is None:
        pytest.skip("no BRISQUE model files (Debian opencv-data); `make install` unpacks them")
    s = Outcome(weights=(0, 0, 1))
    img = np.asarray(builtin_image("astronaut", 256))
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 30, img.shape), 0, 255).astype(np.uint8)
    q = [s.score(x, img, img, None)["quality"] for x in (img, noisy)]
    assert q[0] > q[1] + 0.2


def test_train_with_outcome_reward_survives_a_crashing_agent(tmp_path, monkeypatch):
    """The tiny planner writes no plans, so its rollouts are replaced by gold plans; the face agent raises."""
    import train
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from gpu_check import decoded_as
    real_find = regions.find
    plans = [plan(("blur", "background", "strongly"), ("brighten", "face", "slightly")),
             plan(("darken", "whole image", "slightly"))]

    def find(image, subject):
        if subject == "face":
            raise RuntimeError("face detector crashed")
        return real_find(image, subject)
    monkeypatch.setattr(regions, "find", find)
    out = tmp_path / "run"
    train.main(train.parse_args(["--preset=tiny", "--reward=both", f"--out_dir={out}", "--steps=2"]), decoded_as(plans))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["phase"] == "grpo"]
    assert len(grpo) == 2 and (out / "adapter" / "adapter_config.json").exists()
    assert sum(r["failed"] for r in grpo) > 0 and sum(r["agent_errors"] for r in grpo) >= 1
    assert all("target" in r and "paper_reward" in r and "outcome_seconds" in r for r in grpo)


def test_keyword_baseline():
    from eval import keyword_plan
    assert keyword_plan("Make the cat much brighter and blur the background a little") == \
        plan(("brighten", "cat", "strongly"), ("blur", "background", "slightly"))
    assert keyword_plan("crop the photo to 16:9, then rotate it by 90 degrees") == \
        plan(("crop", "whole image", "16:9"), ("rotate", "whole image", "90 degrees"))
    assert keyword_plan("change the color of the red circle to blue") == plan(("recolor", "red circle", "blue"))
    assert keyword_plan("make it look like a film noir still") == "<action></action><subject></subject><goal></goal>"
    assert keyword_plan("straighten it: rotate the photo 5 degrees counterclockwise") == \
        plan(("rotate", "whole image", "5 degrees counterclockwise"))


def test_eval_table_and_files(tmp_path):
    import eval as ev
    for name, reward, seed in (("p0", "paper", 0), ("p1", "paper", 1), ("o0", "outcome", 0), ("t", "paper", 0)):
        run = tmp_path / "runs" / name
        (run / "adapter").mkdir(parents=True)
        (run / "cold_start").mkdir()
        cfg = {"preset": "tiny" if name == "t" else "cpu", "describe": True, "seed": seed, "reward": reward,
               "steps": 25, **({"constrain": True} if reward == "outcome" else {})}
        (run / "config.json").write_text(json.dumps(cfg))
        (run / "metrics.jsonl").write_text(json.dumps({"phase": "eval", "step": 25}) + "\n")
    (tmp_path / "runs" / "o1" / "adapter").mkdir(parents=True)  # a run still going: no final evaluation yet
    (tmp_path / "runs" / "o1" / "config.json").write_text(json.dumps({**cfg, "preset": "cpu", "reward": "outcome"}))
    rows = ev.find_runs(tmp_path / "runs")
    assert sorted(rows) == ["GRPO, outcome reward", "GRPO, paper reward, free rollouts", "cold start"]
    assert [r.name for r, _ in rows["GRPO, paper reward, free rollouts"]] == ["p0", "p1"]
    assert [r.name for r, _ in rows["cold start"]] == ["o0", "p1"]  # one per seed: o0 and p0 share seed 0
    m = {"target": 0.5, "target_1": 0.6, "target_2": 0.4, "edits": 1.5, "preserve": float("nan"), "quality": 0.7,
         "failed": 0.1, "format": 1, "f1_action": 0.3, "f1": 0.4, "edit_f1": 0.35, "paper": 0.6}
    md = ev.table({"keyword baseline": [{"metrics": m}],
                   "GRPO, paper reward": [{"metrics": m}, {"metrics": {**m, "target": 0.7}}]})
    lines = md.splitlines()
    assert lines[2].startswith("| keyword baseline | - | 0.500 | 0.600 | 0.400 | 1.500 | - | 0.700 |")
    assert lines[3].startswith("| GRPO, paper reward | 2 | 0.600 ± 0.100 | 0.600 ± 0.000 | 0.400 ± 0.000 | "
                               "1.500 ± 0.000 | - |")


def test_eval_end_to_end_keyword_only(tmp_path):
    import eval as ev
    res = ev.main(["--n=6", f"--root={tmp_path}", f"--out={tmp_path / 'eval'}", "--examples=2"])
    assert list(res) == ["keyword baseline"]
    (kw,) = res["keyword baseline"]
    from reward import parse
    gold, m = make_split("test", 6), kw["metrics"]
    for key, want in (("target_1", False), ("target_2", True)):  # the split of target similarity by edit count
        vals = [0.0 if r["target"] != r["target"] else r["target"] for r, g in zip(kw["per_request"], gold)
                if r["scorable"] and (len(g["action"]) > 1) == want]
        assert vals and m[key] == pytest.approx(sum(vals) / len(vals), abs=1e-3)
    edits = [len(p["action"]) for p in map(parse, kw["plans"]) if p["ok"]]
    assert m["edits"] == pytest.approx(sum(edits) / len(edits), abs=1e-3)
    assert (tmp_path / "eval" / "examples.png").exists()
    assert "| keyword baseline |" in (tmp_path / "eval" / "table.md").read_text()


def test_phrasing_sets_and_gap(tmp_path, monkeypatch):
    import eval as ev
    from data import grpo_batch
    from phrasings import TEMPLATE_SPLIT, load_requests
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(SystemExit, match="not a finished run folder .no config.json, cold_start, adapter"):
        ev.phrasing_sets(run, 8)
    (run / "cold_start").mkdir()
    (run / "adapter").mkdir()
    cfg = {"seed": 3, "train_n": 200, "sft_n": 20, "steps": 5, "batch_prompts": 4, "resample": 2}
    (run / "config.json").write_text(json.dumps(cfg))
    sets = ev.phrasing_sets(run, 8)
    assert [len(v) for v in sets.values()] == [8, 8, 8] and all("description" in s for v in sets.values() for s in v)
    train = load_requests("", "train", 200, seed=3)
    drawn = {s["instruction"] for k in range(5) for s in grpo_batch(train, 3, k, 4)}
    resampled = {s["instruction"] for k in range(5) for r in (1, 2) for s in grpo_batch(train, 3, k, 4, r)}
    assert {s["instruction"] for s in sets["seen train"]} <= drawn
    assert not {s["instruction"] for s in sets["unseen train"]} & (drawn | resampled | {s["instruction"]
                                                                                          for s in train[:20]})
    for name, want in (("seen train", "train"), ("unseen train", "train"), ("held-out", "test")):
        assert {TEMPLATE_SPLIT[t] for s in sets[name] for t in s["template"].split("+")} == {want}, name

    asked = []
    monkeypatch.setattr(ev, "plans", lambda adapter, samples, cache: asked.append(adapter.name) or
                        [format_plan(s["action"], s["subject"], s["goal"]) for s in samples])  # gold plans
    out = ev.phrasing_gap([run], 8, tmp_path / "plans")
    assert asked == ["cold_start", "adapter"]
    assert out[str(run)]["adapter"] == {"seen train": (1.0, 1.0), "unseen train": (1.0, 1.0), "held-out": (1.0, 1.0)}
