"""The gpu24 planner's code paths (vlm.py) on a random tiny Qwen2.5-VL built offline and loaded through the same
`from_pretrained` code as Qwen/Qwen2.5-VL-7B-Instruct."""
import numpy as np
import pytest
import torch
from PIL import Image

import rollout
import vlm
from train import group_advantages, grpo_loss

REQUESTS = ["blur the background", "make the coat red and crop it square"]


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    return vlm.tiny_folder(tmp_path_factory.mktemp("tiny-vl") / "model")


@pytest.fixture(scope="module")
def tiny_vl(tiny_vl_dir):
    return vlm.load(str(tiny_vl_dir), lora_r=4, lora_alpha=8, dtype=torch.float32)


def images(n=2):  # different sizes, so the prompts have different image-token counts and get left-padded
    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (90 + 40 * i, 120, 3), dtype=np.uint8))
            for i in range(n)]


def test_nf4_language_model_lora_only_on_it(tiny_vl):
    import bitsandbytes as bnb
    mods = dict(tiny_vl.model.named_modules())
    q4 = [n for n, m in mods.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert q4 and all(".language_model." in n for n in q4)                  # vision tower and lm_head stay in dtype
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in mods.items() if ".visual." in n)
    train = [n for n, p in tiny_vl.policy.named_parameters() if p.requires_grad]
    assert train and all("lora_" in n and ".language_model." in n for n in train)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in train} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_sampler_greedy_equals_generate(tiny_vl):
    """The KV-cached group sampler with images (multimodal rope positions, left padding) decodes exactly what
    transformers' generate decodes for each prompt alone."""
    ids, vision = vlm.prompts(tiny_vl, REQUESTS, images())
    assert len(ids[0]) != len(ids[1])
    tok = tiny_vl.tok
    r = rollout.sample_group(tiny_vl.policy, ids, 1, 10, [], tok.pad_token_id, temperature=0, vision=vision)
    for i, im in enumerate(images()):
        text = tok.apply_chat_template([{"role": "system", "content": rollout.SYSTEM}, {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f"Request: {REQUESTS[i]}"}]}], add_generation_prompt=True,
            tokenize=False)
        b = tiny_vl.processor(text=[text], images=[im], return_tensors="pt")
        assert b["input_ids"][0].tolist() == ids[i]
        g = tiny_vl.policy.generate(**b, max_new_tokens=10, do_sample=False)
        assert g[0, len(ids[i]):].tolist() == r.ids[i].tolist()


def test_group_logp_and_grpo_step_changes_only_lora(tiny_vl_dir):
    """Sampled log-probs equal completion_logp's (cached and checkpointed paths), and one GRPO step moves the LoRA
    weights and nothing else (vision tower, 4-bit weights, embeddings)."""
    p = vlm.load(str(tiny_vl_dir), lora_r=4, lora_alpha=8, dtype=torch.float32)
    ids, vision = vlm.prompts(p, REQUESTS, images())
    pad, G = p.tok.pad_token_id, 3
    r = rollout.sample_group(p.policy, ids, G, 8, [], pad, generator=torch.Generator().manual_seed(0), vision=vision)
    p.policy.train()
    logp = rollout.completion_logp(p.policy, ids, r.ids, r.mask, pad, G, vision)
    torch.testing.assert_close(logp, r.logp, atol=1e-4, rtol=1e-4)
    p.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    p.model.enable_input_require_grads()
    ckpt = rollout.completion_logp(p.policy, ids, r.ids, r.mask, pad, G, vision)
    torch.testing.assert_close(ckpt, r.logp, atol=1e-4, rtol=1e-4)
    before = {n: t.detach().clone() for n, t in p.policy.state_dict().items()}
    params = [t for t in p.policy.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    with torch.no_grad(), p.policy.disable_adapter():
        ref = rollout.completion_logp(p.policy, ids, r.ids, r.mask, pad, G, vision)
    adv = group_advantages(torch.arange(2 * G, dtype=torch.float).view(2, G))[0].view(-1)
    loss, _ = grpo_loss(ckpt, ckpt.detach(), ref, adv, r.mask, beta=0.1)
    loss.backward()
    # LoRA B starts at 0, so only the B matrices get a gradient on the first step
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for n, t in p.policy.named_parameters()
               if "lora_B" in n)
    opt.step()
    changed = {n for n, t in p.policy.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any(".visual." in n for n in before) and not any(".visual." in n for n in changed)


def test_judge_scores_from_score_tokens(tiny_vl):
    a, b = images()
    before, after = [a, a, b], [a, b.resize(a.size), a.resize(b.size)]
    s = vlm.judge(tiny_vl, ["blur it", "crop it", "make it red"], before, after, batch=4)
    assert s.shape == (3, 3) and bool(((s >= 0) & (s <= 10)).all())
    assert len({round(x, 5) for x in s.flatten().tolist()}) > 3          # real, input-dependent numbers
    torch.testing.assert_close(vlm.judge(tiny_vl, ["blur it"], [a], [a]), s[:1])  # batching changes nothing
    with torch.no_grad():  # the judge is the base model: a trained adapter does not move its scores
        lora_B = [t for n, t in tiny_vl.policy.named_parameters() if "lora_B" in n]
        for t in lora_B:
            t.add_(0.5)
        moved = vlm.judge(tiny_vl, ["blur it"], [a], [a])
        for t in lora_B:
            t.sub_(0.5)
    torch.testing.assert_close(moved, s[:1])


def test_expected_score_reads_ten_as_one_then_zero():
    """With '1' and '0' as separate tokens (Qwen), P(10) = P('1') P('0' | '1') and P(1) = P('1') (1 - P('0' | '1'))."""
    probs = torch.zeros(3, 10)
    probs[0, 1], probs[1, 1], probs[2, 7] = 1.0, 0.5, 0.25
    probs[1, 3] = 0.5
    torch.testing.assert_close(vlm.expected_score(probs, torch.tensor([1.0, 0.5, 0.9])),
                               torch.tensor([10.0, 0.5 * (0.5 * 1 + 0.5 * 10) + 0.5 * 3, 7.0]))
    eleven = torch.zeros(1, 11)
    eleven[0, 10], eleven[0, 4] = 0.3, 0.1  # renormalised over the score tokens
    torch.testing.assert_close(vlm.expected_score(eleven), torch.tensor([(0.3 * 10 + 0.1 * 4) / 0.4]))


def test_missing_hub_model_names_it_and_how_to_get_it():
    with pytest.raises(RuntimeError, match=r"Qwen/Qwen2.5-VL-7B-Instruct.*huggingface-cli download "
                                           r"Qwen/Qwen2.5-VL-7B-Instruct"):
        vlm.load(vlm.MODELS["7b"])


def test_stop_tokens_come_from_the_generation_config(tiny_vl):
    """Qwen2.5-VL's generation config stops on <|im_end|> and <|endoftext|>; a completion must end at either."""
    stop = rollout.stop_ids(tiny_vl.tok, tiny_vl.model)
    names = set(tiny_vl.tok.convert_ids_to_tokens(stop))
    assert {"<|im_end|>", "<|endoftext|>"} <= names
    assert tiny_vl.model.generation_config.eos_token_id == tiny_vl.tok.convert_tokens_to_ids(["<|im_end|>",
                                                                                              "<|endoftext|>"])


def test_lora_targets_are_respected(tiny_vl_dir):
    p = vlm.load(str(tiny_vl_dir), lora_r=2, lora_alpha=4, dtype=torch.float32, lora_targets=("q_proj", "down_proj"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in p.policy.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "down_proj"}
    assert not any(".visual." in n for n, _ in p.policy.named_parameters() if "lora_" in n)  # language model only


def test_judge_scores_each_distinct_plan_once(tiny_vl, monkeypatch):
    """Identical plans of a group share one judge call and so one reward: no bf16 batch noise between them."""
    from phrasings import make_split
    from reward import Judge, Outcome, format_plan
    s = make_split("test", 1)[0]
    a = format_plan(["brighten"], ["whole image"], ["strongly"])
    b = format_plan(["blur"], ["whole image"], ["strongly"])
    calls = []
    real = vlm.judge

    def judge(planner, requests, befores, afters, batch=6):
        calls.append(len(requests))
        return real(planner, requests, befores, afters, batch) + 0.01 * torch.arange(len(requests))[:, None]
    monkeypatch.setattr(vlm, "judge", judge)
    rewards, info = Judge(tiny_vl, Outcome(64, quality=False))([a, b, a, "no tags", a], [s] * 5)
    assert calls == [2]  # two distinct plans judged, once each
    assert rewards[0] == rewards[2] == rewards[4] != rewards[1] and rewards[3] == 0
    assert info["parsed"].tolist() == [1, 1, 1, 0, 1] and info["failed"].sum() == 0
