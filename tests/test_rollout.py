import pytest
import torch

from rollout import build_prompt, completion_logp, decode, left_pad, sample_group, stop_ids, top_p_filter

REQUESTS = ["make her coat scarlet, her hair copper, and blur the background", "it is far too dark"]


def prompts_of(tok):
    return [build_prompt(tok, r) for r in REQUESTS]


def hf_greedy(model, tok, prompts, n, stop):
    ids, attn, _ = left_pad(prompts, tok.pad_token_id, "cpu")
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False,
                         eos_token_id=stop, pad_token_id=tok.pad_token_id)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name,n", [("tiny", 30), ("smol", 24)])
def test_greedy_equals_generate(name, n, request):
    planner = request.getfixturevalue(name)
    tok, stop = planner.tok, stop_ids(planner.tok)
    prompts = prompts_of(tok)
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    r = sample_group(planner.policy, prompts, 3, n, stop, tok.pad_token_id, temperature=0)
    assert r.ids.shape[0] == 6
    ref = hf_greedy(planner.policy, tok, prompts, n, stop)
    for i in range(2):
        for g in range(3):  # every sample of a greedy group is the prompt's greedy continuation
            ours = r.ids[3 * i + g][r.mask[3 * i + g].bool()].tolist()
            assert ours == ref[i, :len(ours)].tolist()
            assert len(ours) == n or ours[-1] in stop
    assert len(set(r.ids[0].tolist())) > 3  # the continuation is not one token repeated


def test_seed_replays_and_logp_matches(tiny):
    tok, stop = tiny.tok, stop_ids(tiny.tok)
    prompts = prompts_of(tok)

    def run(seed, temperature=1.0):
        g = torch.Generator().manual_seed(seed)
        return sample_group(tiny.policy, prompts, 4, 20, stop, tok.pad_token_id, temperature=temperature, top_p=0.95,
                            generator=g)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.ids, c.ids)
    assert not torch.equal(a.ids[0], a.ids[1])  # samples of a group differ
    # the sampler's log-probs are the teacher-forced log-probs of the same tokens
    with torch.no_grad():
        lp = completion_logp(tiny.policy, prompts, a.ids, a.mask, tok.pad_token_id, group_size=4)
    assert torch.allclose(lp, a.logp, atol=1e-4)
    assert (a.logp[a.mask.bool()] < 0).all() and (a.logp[~a.mask.bool()] == 0).all()
    assert len(decode(tok, a)) == 8
    # at T != 1 both report the tempered distribution the tokens were drawn from, which the GRPO loss needs
    hot = run(1, temperature=0.7)
    with torch.no_grad():
        lp = completion_logp(tiny.policy, prompts, hot.ids, hot.mask, tok.pad_token_id, group_size=4, temperature=0.7)
        plain = completion_logp(tiny.policy, prompts, hot.ids, hot.mask, tok.pad_token_id, group_size=4)
    assert torch.allclose(lp, hot.logp, atol=1e-4)
    assert not torch.allclose(plain, hot.logp, atol=1e-2)  # temperature-1 log-probs are another distribution


def test_stops_at_stop_token(tiny):
    tok = tiny.tok
    prompts = prompts_of(tok)
    free = sample_group(tiny.policy, prompts[:1], 2, 12, [], tok.pad_token_id, temperature=0)
    third = free.ids[0, 2].item()
    first_hit = free.ids[0].tolist().index(third)  # the stop token may appear earlier too
    r = sample_group(tiny.policy, prompts[:1], 2, 12, [third], tok.pad_token_id, temperature=0)
    assert r.mask[0].tolist() == [1] * (first_hit + 1) + [0] * (r.ids.shape[1] - first_hit - 1)
    assert r.ids.shape[1] == first_hit + 1  # decoding ended when every sequence had stopped
    assert r.ids[0, first_hit].item() == third


def test_top_p_filter():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]])
    out = top_p_filter(probs, 0.7)
    assert torch.allclose(out, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.0, 0.9, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_left_pad_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_prompt_has_request_and_description(tiny):
    text = tiny.tok.decode(build_prompt(tiny.tok, "blur it", description="256x256, one person"))
    assert "Request: blur it" in text and "Image: 256x256, one person" in text
    assert text.rstrip().endswith("assistant")


def test_shared_prompt_logp_equals_full_forward(tiny_dir):
    """completion_logp runs the prompts' shared beginning once, each prompt's rest once, and shares that cache with
    the group; values and LoRA gradients must equal a plain forward pass over every full (prompt + completion)
    sequence."""
    import torch.nn.functional as F
    from planner import load_planner
    from rollout import shared_prefix
    p = load_planner("tiny", folder=tiny_dir)
    for m in p.policy.modules():  # a non-zero adapter, so gradients reach both LoRA matrices
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    tok, pad = p.tok, p.tok.pad_token_id
    prompts = prompts_of(tok)
    r = sample_group(p.policy, prompts, 3, 10, stop_ids(tok), pad, generator=torch.Generator().manual_seed(0))
    lora = [q for q in p.policy.parameters() if q.requires_grad]

    def grads(logp):
        p.policy.zero_grad()
        logp.sum().backward()
        return [q.grad.clone() for q in lora]

    assert shared_prefix(prompts) >= 16  # the system prompt: run once for all prompts
    shared = completion_logp(p.policy, prompts, r.ids, r.mask, pad, group_size=3)
    g_shared = grads(shared)
    alone = completion_logp(p.policy, prompts, r.ids, r.mask, pad, group_size=3, min_shared=10**6)
    assert torch.allclose(shared, alone, atol=1e-5)
    full_prompts = [x for x in prompts for _ in range(3)]
    ids, attn, _ = left_pad([x + c[m.bool()].tolist() for x, c, m in zip(full_prompts, r.ids, r.mask)], pad, "cpu")
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = p.policy(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    full = torch.zeros_like(shared)
    for n, (x, m) in enumerate(zip(full_prompts, r.mask)):
        k = int(m.sum())  # the completion is the last k tokens of row n (left padding)
        lp = F.log_softmax(logits[n, -k - 1:-1].float(), -1).gather(-1, ids[n, -k:, None]).squeeze(-1)
        full[n, :k] = lp
    assert torch.allclose(shared, full, atol=1e-4)
    g_full = grads(full)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(g_shared, g_full))
    # with gradient checkpointing (no KV cache in training) the full-sequence path gives the same numbers
    p.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    p.policy.train()
    checkpointed = completion_logp(p.policy, prompts, r.ids, r.mask, pad, group_size=3)
    assert torch.allclose(checkpointed, full, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-3) for a, b in zip(grads(checkpointed), g_full))


def test_lora_computes_in_the_planners_bf16(tiny_dir):
    """On a bf16 planner the adapters multiply in bf16 (without autocast peft casts each input to its fp32 and keeps
    that copy for the backward); the log-probs and the LoRA gradients stay fp32 and match the fp32 adapter math."""
    from planner import load_planner
    from rollout import completion_logits, token_logp
    p = load_planner("tiny", folder=tiny_dir, dtype=torch.bfloat16, lora_targets=("q_proj", "v_proj", "down_proj"))
    for m in p.policy.modules():  # non-zero
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    seen = set()
    for name, m in p.policy.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    tok, pad = p.tok, p.tok.pad_token_id
    prompts = prompts_of(tok)
    r = sample_group(p.policy, prompts, 2, 8, stop_ids(tok), pad, generator=torch.Generator().manual_seed(0))
    lora = [q for q in p.policy.parameters() if q.requires_grad]
    runs = {"autocast": lambda: completion_logp(p.policy, prompts, r.ids, r.mask, pad, group_size=2),
            "fp32 adapters": lambda: token_logp(completion_logits(p.policy, prompts, r.ids, r.mask, pad, 2, None, 16),
                                                r.ids) * r.mask}
    out = {}
    for name, run in runs.items():
        seen.clear()
        p.policy.zero_grad()
        logp = run()
        logp.sum().backward()
        assert logp.dtype == torch.float32 and all(q.grad.dtype == torch.float32 for q in lora)
        out[name] = seen.copy(), logp.detach(), torch.cat([q.grad.flatten() for q in lora])
    assert out["autocast"][0] == {torch.bfloat16} and out["fp32 adapters"][0] == {torch.float32}
    (_, a, ga), (_, b, gb) = out.values()
    assert (a - b).abs().mean() < 0.05 and (a - b).abs().max() < 0.2 and ga.abs().sum() > 0  # bf16 rounding
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.99
