"""llama.py, edit.py's planner without transformers: the same tokens and logits as transformers, adapter merged."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import llama
from planner import dequantized_folder, load_planner, merge_lora, smollm2_folder
from rollout import build_prompt, stop_ids
from agents import greedy_plans

REQUESTS = ["blur the background", "make her coat scarlet, her hair copper", "crop it square and add grain"]


def test_tokenizer_matches_transformers(tiny, smol):
    for planner, folder in ((tiny, tiny.model.name_or_path), (smol, smollm2_folder()[0])):
        ours = llama.ChatTokenizer(folder)
        for x, d in zip(REQUESTS, [None, "a portrait; 1 face", "text: 'SALE'"]):
            ids = build_prompt(ours, x, d)
            assert ids == build_prompt(planner.tok, x, d)
            assert ours.decode(ids, skip_special_tokens=True) == planner.tok.decode(ids, skip_special_tokens=True)
        assert stop_ids(ours) == stop_ids(planner.tok) and ours.pad_token_id == planner.tok.pad_token_id


def test_logits_match_transformers_with_the_adapter_merged(tiny_dir, tiny_adapter):
    ref = load_planner("tiny", folder=tiny_dir, adapter=tiny_adapter, dequantized=True)
    model, tok = llama.load(dequantized_folder(tiny_dir), tiny_adapter)
    ids = build_prompt(tok, REQUESTS[1])
    with torch.no_grad():
        want = ref.policy(input_ids=torch.tensor([ids])).logits[0]          # (T, V)
        with ref.policy.disable_adapter():
            base = ref.policy(input_ids=torch.tensor([ids])).logits[0]
    tol = 1e-4 * want.abs().max()  # W + BA merged rounds differently from W x + B(A x)
    cache = []
    got = [model.forward(ids[:-4], cache)] + [model.forward([t], cache) for t in ids[-4:]]  # prefill, then cached
    for g, w in zip(got, want[-5:]):
        assert (g - w).abs().max() < tol
    assert (base[-1] - want[-1]).abs().max() > 100 * tol  # the merged adapter is what made them agree
    plain, _ = llama.load(dequantized_folder(tiny_dir))
    assert (plain.forward(ids, []) - base[-1]).abs().max() < tol


def test_greedy_text_matches_the_transformers_planner(tiny_dir, tiny_adapter):
    ref = load_planner("tiny", folder=tiny_dir, adapter=tiny_adapter, dequantized=True)
    model, tok = llama.load(dequantized_folder(tiny_dir), tiny_adapter)
    ours = [tok.decode(model.greedy(build_prompt(tok, x), 12, stop_ids(tok)), skip_special_tokens=True)
            for x in REQUESTS]
    assert ours == greedy_plans(ref, REQUESTS, 12)
    assert len(set(ours)) > 1 and all(ours)


def test_smollm2_logits_match_transformers():
    """The real model's config (9 heads over 3 key-value heads, rope theta 1e5, tied embeddings) read right."""
    from transformers import AutoModelForCausalLM
    folder = smollm2_folder()[0]
    model, tok = llama.load(folder)
    ids = build_prompt(tok, REQUESTS[0])
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        want = plain(input_ids=torch.tensor([ids])).logits[0, -1]
    assert (model.forward(ids, []) - want).abs().max() < 1e-4 * want.abs().max()


def test_bad_checkpoints_and_adapters(tiny_dir, tiny_adapter, tmp_path):
    with pytest.raises(ValueError, match="plain Llama checkpoints only"):
        llama.Llama({"model_type": "qwen2_5_vl"}, {})
    weights = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="which this model does not have"):
        merge_lora(weights, tiny_adapter)
    cfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="only plain LoRA"):
        llama.load(dequantized_folder(tiny_dir), bad)


def test_edit_py_plans_without_importing_transformers(tiny_dir, tmp_path):
    """The point of llama.py: a cpu or tiny edit never imports transformers or peft (seconds on a small CPU)."""
    cache = tmp_path / "imageedit-r1"
    cache.mkdir()
    os.symlink(tiny_dir, cache / "tiny-llama")
    dequantized_folder(cache / "tiny-llama")  # built here, as a first run would
    Image.new("RGB", (32, 24), "red").save(tmp_path / "p.png")
    code = ("import sys, edit\ntry: edit.main(sys.argv[1:])\nexcept SystemExit as e: print('exit:', e)\n"
            "print('imported:', sorted(m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.png"), "blur it", "--preset=tiny", "--base",
                          "--no-describe", "--max_new_tokens=6"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    assert "planner output:" in out and "imported: []" in out, out
