"""Constrained decoding (rollout.PlanGrammar): plans the CPU agents can run, in the planner's own tokens."""
import numpy as np
import pytest

import editor
from reward import parse
from rollout import build_prompt, decode, plan_grammar, sample_group, stop_ids
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


def test_sampled_plans_are_runnable(tiny):
    """A random model under the grammar: every sample ends, parses, and the editor runs every step of it."""
    tok = tiny.tok
    g = plan_grammar(tok)
    prompts = [build_prompt(tok, "make her coat scarlet"), build_prompt(tok, "too dark")]
    import torch
    r = sample_group(tiny.policy, prompts, 4, 400, stop_ids(tok), tok.pad_token_id, generator=torch.Generator(),
                     grammar=g)
    texts, img = decode(tok, r), np.full((16, 16, 3), 120, np.uint8)
    assert all(r.mask[i].sum() < r.mask.shape[1] or r.ids[i, -1].item() in g.stop for i in range(8))
    for text in texts:
        p = parse(text)
        assert p["ok"] and g.state(text) == "done", text
        for a, s, goal in zip(p["action"], p["subject"], p["goal"]):
            assert goal in editor.goal_choices(a)
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
