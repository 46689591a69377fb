import time

import bitsandbytes as bnb
import pytest
import torch

from planner import no_avx512_repack, load_planner, smollm2_folder
from rollout import build_prompt, completion_logp, sample_group, stop_ids


def lora_loss(planner):
    tok = planner.tok
    prompts = [build_prompt(tok, "blur the background")]
    ids = torch.tensor([tok("<action>blur</action>")["input_ids"]])
    return -completion_logp(planner.policy, prompts, ids, torch.ones_like(ids), tok.pad_token_id).sum()


def test_lora_config_reaches_model(tiny_dir):
    p = load_planner("tiny", folder=tiny_dir, lora_r=4, lora_alpha=12, lora_targets=("q_proj", "v_proj"))
    attn = p.policy.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.lora_A["default"].weight.shape == (4, p.model.config.hidden_size)
    assert attn.v_proj.r["default"] == 4 and attn.q_proj.scaling["default"] == 3.0
    assert not hasattr(attn.k_proj, "lora_A")  # not a target
    names = [n for n, q in p.policy.named_parameters() if q.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert len(names) == 2 * 2 * p.model.config.num_hidden_layers  # A and B, two targets, every layer


@pytest.mark.parametrize("name", ["tiny", "smol"])
def test_layers_are_4bit(name, request):
    p = request.getfixturevalue(name)
    linears = [m for n, m in p.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * p.model.config.num_hidden_layers  # q k v o gate up down in every layer
    for m in linears:
        assert m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4"
        assert m.weight.numel() * 2 == m.in_features * m.out_features  # two 4-bit values per byte
    assert not isinstance(p.model.lm_head, bnb.nn.Linear4bit)


def test_gradients_only_reach_lora(tiny_dir):
    p = load_planner("tiny", folder=tiny_dir)
    lora_loss(p).backward()
    got = {n for n, q in p.policy.named_parameters() if q.grad is not None}
    assert got and all("lora_" in n for n in got)
    assert any("lora_A" in n for n in got) and any(q.grad.abs().sum() > 0 for n, q in p.policy.named_parameters()
                                                  if q.grad is not None)


@pytest.mark.parametrize("name", ["tiny", "cpu"])
def test_sampling_pass_keeps_lora_gradients(name, tiny_dir):
    """The AVX512-BF16 trap of DESIGN section 6: a no_grad eval() pass must not change later LoRA gradients."""
    p = load_planner(name, folder=tiny_dir if name == "tiny" else None)
    assert no_avx512_repack(p.model) == 7 * p.model.config.num_hidden_layers
    assert all(not m.support_avx512bf16_for_cpu for m in p.model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))

    def grads():
        p.policy.train()
        p.policy.zero_grad()
        lora_loss(p).backward()
        return {n: q.grad.clone() for n, q in p.policy.named_parameters() if q.grad is not None}

    before = grads()
    p.policy.eval()
    sample_group(p.policy, [build_prompt(p.tok, "too dark")], 2, 4, stop_ids(p.tok), p.tok.pad_token_id)
    after = grads()
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_second_load_skips_conversion(smol):
    t0 = time.time()
    folder, spent = smollm2_folder()
    assert spent == 0.0 and time.time() - t0 < 1.0
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()


def test_cache_respects_xdg(tmp_path, monkeypatch):
    from planner import cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "imageedit-r1"


@pytest.mark.slow
def test_first_load_converts(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder, spent = smollm2_folder()
    assert spent > 0 and folder.parent == tmp_path / "imageedit-r1"
    assert smollm2_folder() == (folder, 0.0)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


def test_unknown_preset():
    with pytest.raises(ValueError, match="no Llama planner for preset 'big'"):
        load_planner("big")


# ----------------------------------------------------------------------------------------------------------------
# the lazy registry and the sequencing agent

def test_importing_agents_loads_no_model():
    import subprocess
    import sys
    code = ("import sys, registry; heavy = ('cv2', 'mediapipe', 'rapidocr_onnxruntime', 'editor', 'regions'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy), registry.loaded())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"  # the registry imports no agent's library
    code = ("import sys, agents; heavy = ('mediapipe', 'rapidocr_onnxruntime', 'transformers', 'diffusers'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy), agents.loaded())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"  # the team imports the region agents' code, but loads no model
    code = "import sys, planner; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # edit.py reads an adapter's preset from here before anything loads: it stays fast


def test_registry_loads_once_and_fakes_swap_in(monkeypatch):
    import agents
    calls = []
    monkeypatch.setitem(agents.LOADERS, "fake", lambda: calls.append(1) or "the agent")
    assert agents.agent("fake") == "the agent" and agents.agent("fake") == "the agent"
    assert calls == [1] and "fake" in agents.loaded() and agents.LOAD_SECONDS["fake"] >= 0
    agents.unload("fake")
    assert "fake" not in agents.loaded()
    with pytest.raises(KeyError, match="no agent called 'nope'"):
        agents.agent("nope")


PLAN = {"action": ["add grain", "recolor", "crop", "brighten", "remove"],
        "subject": ["whole image", "coat", "whole image", "face", "text"],
        "goal": ["slightly", "scarlet", "16:9", "strongly", "full"]}


def test_rule_order_stages_and_stability():
    from agents import sequence
    steps, how = sequence(PLAN)
    assert [s.action for s in steps] == ["crop", "remove", "recolor", "brighten", "add grain"]
    assert how.startswith("rules") and steps[2].text == "recolor the coat: scarlet"
    two = {"action": ["blur", "sharpen"], "subject": ["left", "right"], "goal": ["slightly", "strongly"]}
    assert [s.subject for s in sequence(two)[0]] == ["left", "right"]  # same stage: the plan's order is kept
    one = {"action": ["blur"], "subject": ["background"], "goal": ["strongly"]}
    assert sequence(one, planner="unused")[1] == "single step: nothing to order"


@pytest.mark.parametrize("answer,used", [("2, 1, 3, 5, 4", "model"), ("5, 4, 3, 2, 1, 5,", "model"),
                                         ("1, 1, 2", "rules"), ("1, 2", "rules"), ("", "rules"),
                                         ("9, 1, 2, 3, 4", "rules")])
def test_sequencer_model_answer_or_fallback(tiny, monkeypatch, answer, used):
    import rollout
    from agents import sequence
    monkeypatch.setattr(rollout, "decode", lambda tok, roll: [answer])
    steps, how = sequence(PLAN, tiny)
    assert how.startswith(used), how
    if used == "model":
        order = [int(n) - 1 for n in answer.replace(",", " ").split()][:5]
        assert [s.action for s in steps] == [PLAN["action"][i] for i in order]
    else:
        assert [s.action for s in steps] == ["crop", "remove", "recolor", "brighten", "add grain"]
        assert "not an order of 1..5" in how


def test_sequencer_real_model_answers_in_digits(tiny):
    from agents import sequence
    import re
    steps, how = sequence(PLAN, tiny)  # the random model's constrained answer: digits and commas only
    assert sorted(s.action for s in steps) == sorted(PLAN["action"])
    answer = re.search(r"(?:answer |\()'([^']*)'", how).group(1)  # "model ('...')" or "the model's answer '...'"
    assert answer.strip() and set(answer) <= set("0123456789, "), how


def test_sampler_allowed_tokens(tiny):
    tok = tiny.tok
    allowed = tok("1, 2, 3", add_special_tokens=False)["input_ids"]
    r = sample_group(tiny.policy, [build_prompt(tok, "order these")], 4, 10, stop_ids(tok), tok.pad_token_id,
                     temperature=1.0, generator=torch.Generator().manual_seed(0), allowed=allowed)
    drawn = set(r.ids[r.mask.bool()].tolist())
    assert drawn and drawn <= set(allowed) | set(stop_ids(tok))


def test_dequantized_planner_computes_the_same_numbers(tiny_dir, tiny_adapter):
    """The inference planner (NF4 weights stored dequantized) gives the 4-bit model's logits, adapter and all."""
    q = load_planner("tiny", folder=tiny_dir, adapter=tiny_adapter)
    d = load_planner("tiny", folder=tiny_dir, adapter=tiny_adapter, dequantized=True)
    assert not any(isinstance(x, bnb.nn.Linear4bit) for x in d.model.modules())
    ids = torch.tensor([build_prompt(q.tok, "blur the background")])
    with torch.no_grad():
        b, c = (x.policy(input_ids=ids).logits for x in (q, d))
        with d.policy.disable_adapter():
            base = d.policy(input_ids=ids).logits
    assert torch.allclose(b, c, atol=1e-5)
    assert (c - base).abs().max() > 1e-2  # the adapter changed the outputs
