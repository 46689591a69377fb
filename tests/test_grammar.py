"""Constrained decoding (rollout.PlanGrammar): plans the CPU agents can run, in the planner's own tokens."""
import re

import numpy as np
import pytest
import torch

import editor
from reward import parse
from rollout import PlanGrammar, build_prompt, decode, plan_grammar, sample_group, stop_ids
from agents import greedy_plans

PLAN = "<action>recolor; blur</action><subject>red car; background</subject><goal>scarlet; slightly</goal>"


def test_plan_states(smol):
    g = plan_grammar(smol.tok)
    assert g.state(PLAN) == "done"
    text = ""
    for i in smol.tok(PLAN, add_special_tokens=False)["input_ids"][:-1]:  # at every token boundary: not yet done
        text += g.strings[i]
        assert g.state(text) == "open", text
    for bad in [PLAN.replace("recolor", "sepia filter"),           # not an action of the editor
                PLAN.replace("scarlet", "slightly"),                # not a goal of recolor
                PLAN.replace("red car; background", "red car"),     # fewer subjects than actions
                PLAN.replace("red car", "red car<b>"),              # a tag inside a subject
                PLAN.replace("; blur", ";blur"),                    # items are separated by '; '
                PLAN + " and more",                                 # anything after the plan
                "<action>blur; blur; blur; blur; blur",             # more than MAX_ITEMS edits
                "<goal>"]:
        assert g.state(bad) is None, bad


def test_actions_only_in_their_own_tokens(smol):
    """'sepia' may be written the way the tokenizer writes it, not as 'sep' + 'ia' or 's' + 'epia'."""
    g = plan_grammar(smol.tok)
    inside = [a[:k] for a in g.choices["action"] for k in range(1, len(a))]
    split = [p for p in inside if p not in g.pieces["action", ""]]
    assert split and all(g.state("<action>" + p) is None for p in split)
    assert all(g.state("<action>" + p) == "open" for p in g.pieces["action", ""])
    assert g.state("<action> blur") is None and g.state("<action>blur; blur") == "open"


def one_edit(action, goal):
    return f"<action>{action}</action><subject>it</subject><goal>{goal}</goal>"


def test_free_goals(smol):
    """Any angle, ratio, shade or hex colour the editor reads is a goal; what it cannot read is not."""
    g = plan_grammar(smol.tok)
    good = [("rotate", "5 degrees counterclockwise"), ("rotate", "45 degrees"), ("rotate", "359 degrees clockwise"),
            ("crop", "3:2"), ("crop", "5:4"), ("crop", "21:1"), ("recolor", "#ff8800"), ("recolor", "light blue"),
            ("replace background", "#0a0b0c"), ("replace background", "dark teal"), ("replace background", "blurred")]
    for action, goal in good:
        plan = one_edit(action, goal)
        assert g.state(plan) == "done", plan
        text = ""
        for i in smol.tok(plan, add_special_tokens=False)["input_ids"][:-1]:  # reachable in the planner's tokens
            text += g.strings[i]
            assert g.state(text) == "open", text
    second = "<action>blur; rotate</action><subject>it; it</subject><goal>slightly; 5 degrees counterclockwise"
    assert g.state(second + "</goal>") == "done" and g.state(second.replace(" counterclockwise", "")) == "open"
    assert g.state(second.replace("5 degrees counterclockwise", "5 deg")) is None  # ' degrees' is one token
    with pytest.raises(editor.EditError):
        editor.color("chartreuse")  # not a colour of the editor, so not one of the grammar
    bad = [("rotate", "400 degrees"), ("rotate", "0 degrees"), ("rotate", "5 degrees sideways"), ("crop", "0:3"),
           ("crop", "22:1"), ("recolor", "#ff88zz"), ("recolor", "#ff880"), ("recolor", "#ff88000"),
           ("recolor", "#FF8800"), ("recolor", "chartreuse"), ("recolor", "light #ff8800"), ("blur", "#ff8800")]
    for action, goal in bad:
        assert g.state(one_edit(action, goal)) is None, goal
    assert g.state(one_edit("recolor", "#ff880").replace("</goal>", "")) == "open"  # 5 digits: still being written


def test_hex_digits_are_reachable(smol):
    """A '#rrggbb' begun is always finished: when no likely token fits, the common tokens offer every hex digit."""
    g = PlanGrammar(smol.tok, stop_ids(smol.tok), top_k=0)  # no likely tokens: the mask falls back at once
    start = "<action>recolor</action><subject>it</subject><goal>"
    for text in [start + "#", start + "#ff8", start + "#ff880"]:
        ok = g.mask([text], torch.zeros(1, len(g.strings)))[0].nonzero().flatten().tolist()
        assert ok and all(g.fits(text, t) for t in ok), text
        assert set("0123456789abcdef") <= {g.strings[t][0] for t in ok}, text  # each digit can come next


def test_goal_choices_are_read_by_the_editor():
    """Every goal the grammar lists is read by the editor's readers, to the value it says: positive angles turn
    clockwise and 'counterclockwise' negates (editor.angle's docstring); the short canonical goals come first."""
    rotate, crop = editor.goal_choices("rotate"), editor.goal_choices("crop")
    assert rotate[:3] == ["90 degrees", "180 degrees", "270 degrees"] and len(set(rotate)) == len(rotate) == 3 * 359
    for goal in rotate:
        n = int(goal.split()[0])
        assert editor.angle(goal) == (-n if goal.endswith("counterclockwise") else n), goal
    assert editor.angle("5 degrees counterclockwise") == -5 and "5 degrees counterclockwise" in rotate
    assert crop[:7] == ["square", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3"] and len(set(crop)) == len(crop) == 442
    for goal in crop:
        w, h = (1, 1) if goal == "square" else map(int, goal.split(":"))
        assert editor.ratio(goal) == w / h, goal
    for action in editor.COLOR_ACTIONS:
        goals = editor.goal_choices(action)
        assert goals[:len(editor.COLORS)] == list(editor.COLORS)
        [editor.color(c) for c in goals if c != "blurred"]  # raises EditError for a colour it cannot read
    assert editor.color("light blue") != editor.color("blue") != editor.color("dark blue")
    assert editor.goal_choices("blur") == ["slightly", "moderately", "strongly"]


def test_sampled_plans_are_runnable(tiny):
    """A random model under the grammar: every sample ends, parses, and the editor runs every step of it."""
    tok = tiny.tok
    g = plan_grammar(tok)
    prompts = [build_prompt(tok, "make her coat scarlet"), build_prompt(tok, "too dark")]
    r = sample_group(tiny.policy, prompts, 4, 400, stop_ids(tok), tok.pad_token_id, generator=torch.Generator(),
                     grammar=g)
    texts, img = decode(tok, r), np.full((16, 16, 3), 120, np.uint8)
    assert all(r.mask[i].sum() < r.mask.shape[1] or r.ids[i, -1].item() in g.stop for i in range(8))
    for text in texts:
        p = parse(text)
        assert p["ok"] and g.state(text) == "done", text
        for a, s, goal in zip(p["action"], p["subject"], p["goal"]):
            assert goal in editor.goal_choices(a) or re.fullmatch("#[0-9a-f]{6}", goal)  # hex: by pattern
            editor.apply(img, a, goal, np.ones((16, 16), np.float32))  # raises EditError for anything it cannot do
    assert r.logp[r.mask.bool()].max() <= 0 and len(set(texts)) > 1


def test_greedy_plan_of_smollm2(smol):
    """The real planner, zero-shot: free text is not a plan; under the grammar it is one the editor runs."""
    requests = ["Give the left half a sepia filter", "Make the background feel like a cold winter morning"]
    free = greedy_plans(smol, requests, 48)
    plans = greedy_plans(smol, requests, 48, grammar=plan_grammar(smol.tok))
    assert not any(parse(t)["ok"] for t in free)
    for text in plans:
        p = parse(text)
        assert p["ok"] and all(a in editor.ACTIONS for a in p["action"]), text


@pytest.mark.parametrize("n", [60])
def test_llama_greedy_under_the_grammar(tiny_dir, tiny_adapter, n):
    import llama
    from planner import dequantized_folder, load_planner
    ref = load_planner("tiny", folder=tiny_dir, adapter=tiny_adapter, dequantized=True)
    model, tok = llama.load(dequantized_folder(tiny_dir), tiny_adapter)
    requests = ["make her coat scarlet", "it is far too dark"]
    ours = [tok.decode(model.greedy(build_prompt(tok, x), n, stop_ids(tok), plan_grammar(tok)),
                       skip_special_tokens=True) for x in requests]
    assert ours == greedy_plans(ref, requests, n, grammar=plan_grammar(ref.tok))
    assert all(t.startswith("<action>") for t in ours)


def test_train_rollouts_follow_the_grammar(tmp_path, monkeypatch):
    """--constrain=True: every sampled completion of a GRPO step, and every evaluation plan, is a runnable plan."""
    import rollout
    from train import main, parse_args
    texts, sample = [], rollout.sample_group

    def spy(model, prompts, *a, **k):
        r = sample(model, prompts, *a, **k)
        if k.get("grammar") is not None:
            texts.extend(rollout.decode(k["grammar"].tok, r))
        return r
    monkeypatch.setattr(rollout, "sample_group", spy)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    main(parse_args(["--preset=tiny", f"--out_dir={tmp_path}", "--constrain=True", "--max_new_tokens=400",
                     "--steps=1", "--sft_steps=0"]))
    assert len(texts) >= 2 * 4 + 4 and all(parse(t)["ok"] for t in texts)  # a step's 2x4 samples, the evaluations
