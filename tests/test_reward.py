import pytest
import torch
from hypothesis import given, settings, strategies as st

from reward import f1, format_plan, normalize, paper_rewards, parse

GOLD = {"action": ["recolor", "blur"], "subject": ["coat", "background"], "goal": ["scarlet", "strongly"]}


@settings(max_examples=400, deadline=None)
@given(st.text() | st.lists(st.sampled_from(["<action>", "</action>", "<subject>", "</subject>", "<goal>",
                                             "</goal>", "<think>", "</think>", ";", " ", "blur", "", "\n"])).map("".join))
def test_parse_never_raises(text):
    p = parse(text)
    assert set(p) == {"ok", "action", "subject", "goal"}
    assert isinstance(p["ok"], bool)
    r, info = paper_rewards([text], [GOLD])
    assert 0.0 <= r.item() <= 1.0 and torch.isfinite(r).all()


@pytest.mark.parametrize("bad", [None, 12, b"<action>x</action>"])
def test_parse_non_strings(bad):
    assert parse(bad)["ok"] is False


def test_format_rule():
    ok = "<action>recolor; blur</action><subject>coat; background</subject><goal>scarlet; strongly</goal>"
    assert parse(ok)["ok"] and parse("<think>hmm</think>\n" + ok)["ok"]
    assert parse(ok)["action"] == ["recolor", "blur"]
    bad = [
        "<action>recolor</action><subject>coat</subject>",                               # a tag missing
        "<subject>coat</subject><action>recolor</action><goal>red</goal>",              # out of order
        "<action>recolor; blur</action><subject>coat</subject><goal>red; strongly</goal>",  # misaligned counts
        "<action>recolor;</action><subject>coat;</subject><goal>red;</goal>",           # empty item
        "<action></action><subject></subject><goal></goal>",                            # empty tags
        ok + "<action>blur</action>",                                                    # a tag twice
    ]
    assert [parse(b)["ok"] for b in bad] == [False] * len(bad)


def test_normalize():
    assert normalize("The Red-Car!", "subject") == "red car"
    assert normalize("  Black and White ", "action") == "grayscale"
    assert normalize("a little", "goal") == "slightly"
    assert normalize("the background", "subject") == "background"
    assert normalize("blur", "action") == "blur" and normalize("blur", "goal") == "blurred"
    assert normalize("16:9", "goal") == "16:9" and normalize("a", "subject") == "a"


def test_f1_hand_worked():
    assert f1([], []) == 1.0
    assert f1([], ["blur"]) == 0.0 and f1(["blur"], []) == 0.0
    assert f1(["blur", "crop"], ["blur", "crop"]) == 1.0
    assert f1(["crop", "blur"], ["blur", "crop"]) == 1.0                       # order-free
    assert f1(["blur"], ["blur", "crop"]) == pytest.approx(2 / 3)             # p=1, r=1/2
    assert f1(["blur", "blur"], ["blur"]) == pytest.approx(2 / 3)             # duplicate: p=1/2, r=1
    assert f1(["blur", "blur"], ["blur", "blur", "crop"]) == pytest.approx(0.8)  # p=1, r=2/3
    assert f1(["a", "b", "c"], ["c", "d"]) == pytest.approx(0.4)              # p=1/3, r=1/2


def test_paper_rewards_batch():
    texts = [
        format_plan(GOLD["action"], GOLD["subject"], GOLD["goal"]),              # perfect
        "<action>Recolour; blurred</action><subject>the coat; bg</subject><goal>scarlet; strong</goal>",  # synonyms
        "<action>blur</action><subject>background</subject><goal>strongly</goal>",  # half the edits
        "<action>blur; recolor</action><subject>background</subject><goal>strongly</goal>",  # misaligned
        "I would make the coat red.",                                               # no tags
    ]
    r, info = paper_rewards(texts, [GOLD] * len(texts))
    assert r.shape == (5,) and set(info) == {"format", "f1_action", "f1_subject", "f1_goal", "f1", "edit_f1",
                                             "edit_count"}
    assert info["format"].tolist() == [1, 1, 1, 0, 0]
    assert r[:2].tolist() == [1.0, 1.0]
    assert r[2].item() == pytest.approx((1 + 3 * (2 / 3)) / 4)
    # misaligned: no format point; action F1 1, subject and goal 2/3 each
    assert info["f1_action"][3].item() == 1.0 and r[3].item() == pytest.approx((0 + 1 + 4 / 3) / 4)
    assert r[4].item() == 0.0
    assert info["f1"][2].item() == pytest.approx(2 / 3)


def test_edit_reward_pays_for_a_guess_at_a_second_edit():
    """The edit-level reward: F1 over whole edits, and a count term, so that guessing a request's second edit costs
    nothing on average where the per-field F1 punishes it (a plan of one edit scores more than one with a wrong
    second edit)."""
    from reward import edit_rewards
    gold = {"action": ["recolor", "blur"], "subject": ["coat", "background"], "goal": ["scarlet", "strongly"]}
    plans = [(["recolor"], ["coat"], ["scarlet"]),                                     # the second edit left out
             (["recolor", "sharpen"], ["coat", "person"], ["scarlet", "slightly"]),    # a wrong second edit
             (["recolor", "sharpen"], ["coat", "background"], ["scarlet", "strongly"]),  # the wrong action only
             (["blur", "recolor"], ["background", "coat"], ["strongly", "scarlet"])]   # right, in another order
    texts = [format_plan(*p) for p in plans] + ["<action>blur</action>"]
    r, info = edit_rewards(texts, [gold] * 5)
    assert info["edit_f1"].tolist() == pytest.approx([2 / 3, 1 / 2, 5 / 6, 1, 0])
    assert info["edit_count"].tolist() == [0.5, 1, 1, 1, 0]
    assert r.tolist() == pytest.approx([0.7, 0.7, 0.9, 1.0, 0.0])
    paper = info["paper_reward"]
    assert paper[0] > paper[1] and r[0] == pytest.approx(r[1].item())  # the paper's reward punishes the guess
    # edits are paired by their fields, not their position: the per-field F1 cannot tell these two plans apart
    swapped = format_plan(["recolor", "blur"], ["background", "coat"], ["strongly", "scarlet"])
    _, both = edit_rewards([texts[3], swapped], [gold] * 2)
    assert both["f1"].tolist() == [1.0, 1.0] and both["edit_f1"][1] == pytest.approx(2 / 3)  # 2 of 3 fields a pair


def test_paper_rewards_length_mismatch():
    with pytest.raises(AssertionError, match="2 completions but 1 labels"):
        paper_rewards(["a", "b"], [GOLD])
