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
    assert r.shape == (5,) and set(info) == {"format", "f1_action", "f1_subject", "f1_goal", "f1"}
    assert info["format"].tolist() == [1, 1, 1, 0, 0]
    assert r[:2].tolist() == [1.0, 1.0]
    assert r[2].item() == pytest.approx((1 + 3 * (2 / 3)) / 4)
    # misaligned: no format point; action F1 1, subject and goal 2/3 each
    assert info["f1_action"][3].item() == 1.0 and r[3].item() == pytest.approx((0 + 1 + 4 / 3) / 4)
    assert r[4].item() == 0.0
    assert info["f1"][2].item() == pytest.approx(2 / 3)


def test_paper_rewards_length_mismatch():
    with pytest.raises(AssertionError, match="2 completions but 1 labels"):
        paper_rewards(["a", "b"], [GOLD])
