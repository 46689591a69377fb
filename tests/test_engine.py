"""The rollout engine (engine.py), the sampler's draw and the log-probs without a log-softmax tensor."""
import json

import pytest
import torch
import torch.nn.functional as F

import engine
import memory
from config import parse_args
from engine import Merged, choose_engine
from gpu_check import random_reward
from rollout import draw, token_logp


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    toks = draw(probs, torch.Generator().manual_seed(0)).view(20000, 2)
    share = torch.bincount(toks[:, 0], minlength=4) / 20000
    assert torch.allclose(share, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01) and share[1] == 0
    assert (toks[:, 1] == 3).all()
    a, b = (draw(probs, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b)  # a seed replays
    wide = torch.zeros(20000, 1000)  # across draw's blocks of 256 tokens, the last one short
    wide[:, [5, 255, 256, 999]] = torch.tensor([0.2, 0.3, 0.1, 0.4])
    share = torch.bincount(draw(wide, torch.Generator().manual_seed(2)), minlength=1000) / 20000
    assert torch.allclose(share[[5, 255, 256, 999]], torch.tensor([0.2, 0.3, 0.1, 0.4]), atol=0.01)
    assert share.sum() == 1 and share[[5, 255, 256, 999]].sum() == 1


def test_packed_linear_computes_what_f_linear_computes():
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.bfloat16, 0.0), (torch.float32, 1e-4)):
        w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
        for shape in ((1, 64), (32, 1, 64), (3, 7, 64)):
            x = torch.randn(shape, generator=g).to(dtype)
            for bias in (None, b):
                assert (engine.Packed(w, bias)(x) - F.linear(x, w, bias)).abs().max() <= tol


def test_group_attention_samples_what_sdpa_over_the_repeated_cache_samples(tiny, tiny_dir):
    """The copy's grouped decoding (each prompt's keys once per group) against SDPA over the cache repeated G times:
    prompts of different lengths (left padding), G=4, sampled at temperature 1 from one seed."""
    from rollout import build_prompt, sample_group, stop_ids
    copy = Merged(tiny_dir, torch.float32)
    assert copy.model.config._attn_implementation == "grouped"
    assert isinstance(copy.model.lm_head, engine.Packed) == engine.packs()  # packed where this torch can
    prompts = [build_prompt(tiny.tok, r) for r in ("blur the background", "make her coat scarlet and rotate it")]
    assert len(set(map(len, prompts))) == 2
    rolls = []
    for impl in ("grouped", "sdpa"):
        copy.model.set_attn_implementation(impl)
        rolls.append(sample_group(copy.model, prompts, 4, 20, stop_ids(tiny.tok), tiny.tok.pad_token_id,
                                  generator=torch.Generator().manual_seed(0)))
    grouped, sdpa = rolls
    assert grouped.ids.shape == (8, 20) and torch.equal(grouped.ids, sdpa.ids)
    assert (grouped.logp - sdpa.logp).abs().max() < 1e-4  # fp32 sums in another order


def test_token_logp_is_the_log_softmax_at_the_ids():
    logits, ids = torch.randn(3, 5, 50), torch.randint(0, 50, (3, 5))
    for t in (1.0, 0.8):
        want = F.log_softmax(logits / t, -1).gather(-1, ids[..., None]).squeeze(-1)
        assert torch.allclose(token_logp(logits, ids, t), want, atol=1e-5)


def set_lora(policy, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in policy.named_parameters():
            if "lora_" in name:
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def clear_lora(policy):
    with torch.no_grad():
        for name, w in policy.named_parameters():
            if "lora_B" in name:
                w.zero_()  # B = 0: the adapter is a no-op again for the session's other tests


def test_merged_copy_computes_what_the_policy_computes(tiny, tiny_dir):
    """After sync the fp32 copy gives the NF4 + LoRA policy's logits, and a second sync replaces the first adapter
    (it merges into the base, not into the last merge)."""
    copy = Merged(tiny_dir, torch.float32)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for seed in (0, 1):
        set_lora(tiny.policy, seed)
        assert copy.sync(tiny.policy) == 4 * 2  # q, k, v, o in each of the 2 layers
        with torch.no_grad():
            want = tiny.policy(input_ids=ids).logits
            got = copy.model(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()  # fp32 sums in another order
    clear_lora(tiny.policy)


@pytest.mark.parametrize("name, folder, scale", [("tiny", None, 0.3), ("smol", "cpu", 0.02)])
def test_merged_engine_decodes_what_the_policy_decodes(request, name, folder, scale):
    """With an adapter merged, the fp32 copy's greedy plans are the NF4 + LoRA policy's up to ties (where they part,
    the policy gives both tokens the same log-prob within 1e-3), and the log-probs the sampler reports for the
    copy's sampled completions are the policy's within 2e-3 per token."""
    from planner import planner_folder
    from rollout import build_prompt, completion_logp, sample_group, stop_ids
    planner = request.getfixturevalue(name)
    policy, tok, pad = planner.policy, planner.tok, planner.tok.pad_token_id
    copy = Merged(request.getfixturevalue("tiny_dir") if folder is None else planner_folder(folder), torch.float32)
    set_lora(policy, 0, scale)
    copy.sync(policy)
    prompts = [build_prompt(tok, r) for r in ("make it black and white and blur the background",
                                              "the photo feels a bit cold", "crop it to a square")]
    stop = stop_ids(tok, policy)
    try:
        with torch.no_grad():
            want, got = (sample_group(m, prompts, 1, 24, stop, pad, temperature=0) for m in (policy, copy.model))
            parted = 0
            for i in range(len(prompts)):
                diff = (want.ids[i] != got.ids[i]).nonzero()
                if len(diff):  # a tie: the policy's log-probs of both tokens at the first place they part
                    j, parted = diff[0].item(), parted + 1
                    both = torch.stack([want.ids[i, :j + 1], got.ids[i, :j + 1]])
                    lp = completion_logp(policy, [prompts[i]], both, torch.ones_like(both), pad, group_size=2)
                    assert abs(lp[0, j] - lp[1, j]) < 1e-3, (name, i, j, lp[:, j])
            assert parted <= 1  # ties are rare: most plans are equal token for token
            roll = sample_group(copy.model, prompts, 4, 24, stop, pad, temperature=0.8,
                                generator=torch.Generator().manual_seed(0))
            logp = completion_logp(policy, prompts, roll.ids, roll.mask, pad, 4, temperature=0.8)
        assert roll.mask.sum() > 3 * 4 * 5
        assert ((logp - roll.logp).abs() * roll.mask).max() < 2e-3
    finally:
        clear_lora(policy)


def test_auto_picks_the_merged_copy_where_it_fits(tiny, monkeypatch):
    cfg = parse_args(["--preset=tiny"])
    copy, why = choose_engine(cfg, tiny, "cpu")
    assert isinstance(copy, Merged) and "MB copy in" in why
    want = torch.bfloat16 if memory.native_bf16("cpu") else torch.float32
    assert next(copy.model.parameters()).dtype == want
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    copy, why = choose_engine(cfg, tiny, "cpu")
    assert copy is None and "does not fit" in why
    assert isinstance(choose_engine(parse_args(["--preset=tiny", "--engine=merged"]), tiny, "cpu")[0], Merged)
    assert choose_engine(parse_args(["--preset=tiny", "--engine=policy"]), tiny, "cpu") == (None, "asked for")
    with pytest.raises(SystemExit, match="engine='merged' is out of range"):
        parse_args(["--preset=tiny_vl", "--engine=merged"])
    with pytest.raises(SystemExit, match="engine='fast' is out of range"):
        parse_args(["--preset=tiny", "--engine=fast"])


@pytest.mark.parametrize("name", ["policy", "merged"])
def test_grpo_samples_from_the_chosen_engine(tmp_path, monkeypatch, name):
    """Both engines train; the log-probs the sampler reported are the policy's up to the copy's rounding, and the
    merged copy follows every update and decodes every evaluation (a copy left behind would drift away from the
    policy step by step: lr=1e-2 moves the tiny model's log-probs by far more than fp32 rounding)."""
    from train import main
    syncs = []
    real = engine.Merged.sync
    monkeypatch.setattr(engine.Merged, "sync", lambda self, policy: syncs.append(1) or real(self, policy))
    monkeypatch.setattr(memory, "native_bf16", lambda device: False)  # an fp32 copy: any gap is a missed update
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / name
    # random weights write no tags: a seeded random reward gives every group a signal
    main(parse_args(["--preset=tiny", f"--engine={name}", f"--out_dir={out}", "--steps=3", "--eval_every=3"]),
         random_reward())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["engine_gap"] for r in rows if r["phase"] == "grpo"]
    assert len(gaps) == 3 and all(r["kept_groups"] > 0 for r in rows if r["phase"] == "grpo")
    if name == "policy":
        assert max(gaps) < 1e-4 and not syncs
    else:
        evals = sum(r["phase"].startswith("eval") for r in rows)  # zero-shot, cold start, step 3: each decoded
        assert evals == 3 and max(gaps) < 1e-3 and len(syncs) == 1 + 3 + evals  # by the copy, synced first


def test_prompts_share_their_beginning_and_get_the_same_logits(tiny):
    """prefill runs the common beginning once; the last logits and the cache equal each prompt's alone."""
    from rollout import prefill, shared_prefix
    head = list(range(5, 45))
    prompts = [head + [50, 51, 52], head + [60], head + [70, 71]]
    assert shared_prefix(prompts) == 40 and shared_prefix([[1, 2], [1, 2]]) == 1 and shared_prefix([[1], [1]]) == 0
    model = tiny.policy
    with torch.no_grad():
        out, attn, pos = prefill(model, prompts, tiny.tok.pad_token_id)
        assert attn.shape == pos.shape == (3, 40 + 3) and attn[1].tolist() == [1] * 40 + [0, 0, 1]
        assert pos[1, -1] == 40 and pos[0, -1] == 42
        for i, p in enumerate(prompts):
            alone = model(input_ids=torch.tensor([p])).logits[0, -1]
            assert torch.allclose(out.logits[i, -1], alone, atol=1e-4)
        full = prefill(model, prompts, tiny.tok.pad_token_id, min_shared=10**6)[0]  # every prompt run whole
        assert torch.allclose(full.logits, out.logits, atol=1e-4)
