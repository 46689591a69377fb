"""The gpu24 preset end to end on the CPU: edit.py and train.py with every gpu24 agent replaced by a tiny random
model of its real class (Qwen2.5-VL planner, OWLv2 + SAM grounding, InstructPix2Pix), and the guards of the preset
on a machine without a GPU."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import agents
import registry
import diffusion
import edit
import grounding
from test_diffusion import sd_parts
from test_grounding import build as build_grounding

PLAN = "<action>recolor; crop</action><subject>the cup; whole image</subject><goal>red; square</goal>"


@pytest.fixture
def gpu24_agents(tmp_path, monkeypatch):
    """The registry's gpu24 agents, loaded from tiny random folders through their real loaders' classes."""
    import diffusers
    diffusers.StableDiffusionInstructPix2PixPipeline(**sd_parts(8)).save_pretrained(tmp_path / "pix2pix")
    owl, sam = build_grounding(tmp_path)
    monkeypatch.setitem(agents.LOADERS, "pix2pix", lambda: diffusion.Pix2Pix(tmp_path / "pix2pix", steps=2, size=32))
    monkeypatch.setitem(agents.LOADERS, "grounding", lambda: grounding.Grounder(owl, sam, threshold=0.0, side=96))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_loaded", {})


def test_edit_on_the_gpu24_path(tmp_path, gpu24_agents, monkeypatch):
    """The VLM planner reads the image (its answer is replaced by a fixed plan: random weights write no tags), the
    planner is dropped before the agents load, grounding finds the cup, pix2pix edits it, the CPU editor crops."""
    real, seen = edit.load_planner, []

    def planner_with_a_fixed_answer(*a, **kw):
        planner, write = real(*a, **kw)
        assert planner.processor is not None  # the Qwen2.5-VL path

        def answer(x, d, image):
            seen.append((write(x, d, image), d, image.size))  # the real VLM call, with the image and no description
            return PLAN
        return planner, answer
    monkeypatch.setattr(edit, "load_planner", planner_with_a_fixed_answer)
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(src)
    rec = edit.main([str(src), "make the cup red and crop it square", "--preset=tiny_vl", "--editor=pix2pix",
                     "--regions=grounding", "--base", "--max_new_tokens=4"])
    assert len(seen) == 1 and isinstance(seen[0][0], str) and seen[0][1] is None and seen[0][2] == (90, 60)
    assert rec["editor"] == "pix2pix" and rec["regions"] == "grounding" and rec["description"] is None
    assert [s["action"] for s in rec["steps"]] == ["crop", "recolor"]  # geometry first (rules)
    assert rec["steps"][1]["agent"] == "grounding" and "error" not in rec["steps"][1]
    assert agents.loaded() == ["retouch", "grounding", "pix2pix"]  # retouch: the CPU editor, for the crop
    out = Image.open(tmp_path / "in_edited.png")
    assert out.size == (60, 60)
    trace = json.loads((tmp_path / "in_edited.json").read_text())
    assert trace["output"].endswith("in_edited.png")


def test_gpu24_without_a_gpu_says_so_and_stops(tmp_path, capsys):
    from train import parse_args
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="gpu24 preset needs a CUDA GPU.*--preset=tiny_vl"):
        parse_args(["--preset=gpu24"])
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(src)
    with pytest.raises(SystemExit, match="gpu24 preset needs a CUDA GPU"):
        edit.main([str(src), "blur it", "--preset=gpu24"])
    assert not (tmp_path / "in_edited.png").exists()


def test_missing_planner_names_the_model(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(src)
    with pytest.raises(SystemExit, match=r"org/not-here.*huggingface-cli download org/not-here"):
        edit.main([str(src), "blur it", "--preset=tiny_vl", "--planner=org/not-here", "--base"])


def test_train_tiny_vl_saves_an_adapter_peft_loads(tmp_path, monkeypatch):
    """train.py on the VLM path: GRPO steps update the LoRA of the language model, and the saved adapter loads
    onto the Qwen2.5-VL base with PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from gpu_check import random_reward
    from train import main, parse_args

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # random weights write no tags: a seeded random reward, so groups update
    main(parse_args(["--preset=tiny_vl", f"--out_dir={tmp_path / 'run'}", "--steps=2", "--eval_every=2"]),
         random_reward())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "grpo"] == [1, 2]
    assert all(r["kept_groups"] == 2 for r in rows if r["phase"] == "grpo")
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "cache" / "imageedit-r1" / "tiny-qwen2.5-vl")
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    lora = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora and all(".language_model." in k for k in lora) and any(v.abs().sum() > 0 for v in lora.values())


def test_judge_reward_trains_the_vlm_planner(tmp_path, monkeypatch):
    """--reward=judge: each sampled plan is run by the agents and the planner's base scores the edit; every
    parsed plan gets the judge's mean score / 10, unparsed ones 0. Random weights write no tags, so the reward is
    shown plans (half of them broken) instead of the samples' text."""
    from gpu_check import decoded_as
    from train import main, parse_args
    plans = ["<action>brighten</action><subject>whole image</subject><goal>slightly</goal>", "no tags here"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    main(parse_args(["--preset=tiny_vl", f"--out_dir={tmp_path / 'run'}", "--steps=1", "--reward=judge",
                     "--outcome_size=64", "--eval_every=5", "--sft_steps=0", "--eval_judge=True"]), decoded_as(plans))
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["phase"] == "grpo"][0]
    assert row["parsed"] == 0.5 and row["failed"] == 0
    for k in ("completion", "quality", "preservation"):
        assert 0 <= row[k] <= 10
    assert row["reward"] == pytest.approx(0.5 * (row["completion"] + row["quality"] + row["preservation"]) / 30,
                                          abs=1e-3)
    assert row["kept_groups"] == 2  # parsed vs unparsed: every group has a signal
    final = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    # the held-out plans are the random model's own (no plan parses): the judge's columns are there, NaN (no plan
    # ran); Judge's scores of real plans are tested in test_vlm
    assert final["phase"] == "eval" and all(final[f"judge_{k}"] != final[f"judge_{k}"]
                                            for k in ("completion", "quality", "preservation"))
    mem = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert "judge" in mem["measured"] and "judge" in mem["estimated"]
    with pytest.raises(SystemExit, match="reward=judge and eval_judge need a VLM planner"):
        main(parse_args(["--preset=tiny", "--reward=judge", f"--out_dir={tmp_path / 'x'}"]))
