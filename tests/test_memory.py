"""The memory plan (memory.py): the gpu24 plan from the configs in configs/, and the estimator against a measured
run on the CPU."""
import json

import pytest
import torch

import memory
from train import main, parse_args

GB = 2**30


def test_gpu24_plan_fits_24gb_from_configs(capsys):
    cfg = parse_args(["--preset=gpu24", "--dry_run=True"])  # no GPU needed for the plan
    assert main(cfg) == []  # a dry run trains nothing
    out = capsys.readouterr().out
    est = memory.estimate(cfg, memory.planner_config(memory.QWEN_7B), memory.prompt_tokens(cfg, None), "cuda")
    peak_phase, peak = est["peak"]
    assert peak_phase == "update" and 8 * GB < peak < 24 * GB - 1 * GB  # room for the CUDA context
    # 7.6B language-model and 0.68B vision parameters: NF4 linears + bf16 embeddings, lm_head and vision tower
    assert 6.0 * GB < est["parts"]["weights"] < 7.0 * GB
    for phase in ("vision", "sample", "eval", "update"):
        assert f"phase {phase}" in out
    assert "group KV cache (8x8" in out and "FLUX.1-Kontext transformer (NF4)" in out
    # what a change costs: twice the group doubles the group's KV cache
    big = memory.estimate(parse_args(["--preset=gpu24", "--dry_run=True", "--group_size=16"]),
                          memory.planner_config(memory.QWEN_7B), 400)
    small = memory.estimate(cfg, memory.planner_config(memory.QWEN_7B), 400)
    assert big["parts"]["group_kv"] == pytest.approx(2 * small["parts"]["group_kv"])


def test_3b_plan_and_unknown_model():
    cfg = parse_args(["--preset=gpu24", "--dry_run=True"])
    e3 = memory.estimate(cfg, memory.planner_config("Qwen/Qwen2.5-VL-3B-Instruct"), 400)
    e7 = memory.estimate(cfg, memory.planner_config(memory.QWEN_7B), 400)
    assert 2 * GB < e3["parts"]["weights"] < e7["parts"]["weights"]
    with pytest.raises(ValueError, match="no config for 'org/unknown'"):
        memory.planner_config("org/unknown")


def test_meter_sees_a_phase_peak():
    m = memory.Meter("cpu", "heap")  # counts from here: what earlier tests left alive is not counted
    with m.phase("alloc"):
        x = torch.ones(25 * 2**20)  # 100 MB, alive at the end
        y = torch.ones(25 * 2**20)  # 100 MB, freed inside the phase
        del y
    with m.phase("idle"):
        pass
    assert 195 * 2**20 <= m.peaks["alloc"] < 260 * 2**20
    assert 95 * 2**20 <= m.peaks["idle"] < 160 * 2**20  # x is alive: counted in every later phase
    del x


def test_rss_meter_reports_each_phase_its_own_peak():
    """The default meter: the kernel's peak resident set, reset at each phase's start."""
    m = memory.Meter("cpu")
    with m.phase("big"):
        x = torch.ones(50 * 2**20)  # 200 MB, written, so resident; freed before the phase ends
        del x
    with m.phase("small"):
        pass
    if not m.resets:
        pytest.skip("this kernel does not let a process reset its peak resident set")
    assert m.peaks["big"] - m.peaks["small"] > 150 * 2**20, m.peaks
    assert m.peaks["small"] > 50 * 2**20  # the interpreter and torch's libraries are resident too
    x = torch.ones(100 * 2**20)  # 400 MB between phases: no phase sees it, the run's peak does
    del x
    with m.phase("small"):
        pass
    assert m.process_peak - m.peaks["big"] > 150 * 2**20
    assert 0 < m.overhead < 0.1  # its own time: three phases' reads and resets of the kernel's counters
    with pytest.raises(ValueError, match="'peak': rss, heap or off"):
        memory.Meter("cpu", "peak")


def test_estimate_within_20_percent_of_a_measured_run(tmp_path, monkeypatch):
    """A real GRPO run (train.main, 2 steps, gradient checkpointing as gpu24 uses) on a small random Qwen2.5-VL
    whose activations, KV cache and logits are each a real share of the peak: the measured peak of every phase
    and of the run is within 20% of the plan."""
    import vlm
    from gpu_check import random_reward
    folder = vlm.tiny_folder(tmp_path / "small-vl", hidden=256, layers=4, intermediate=1024, vocab=32768)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = parse_args(["--preset=tiny_vl", f"--planner={folder}", f"--out_dir={tmp_path / 'run'}", "--steps=2",
                      "--sft_steps=0", "--grad_checkpointing=True", "--max_new_tokens=24", "--eval_every=10",
                      "--max_pixels=50176", "--image_size=224", "--dtype=float32",
                      "--meter=heap"])  # a plan check: every tensor seen
    main(cfg, random_reward())  # random weights write no tags: a seeded random reward, so every group updates
    mem = json.loads((tmp_path / "run" / "memory.json").read_text())
    measured, planned = mem["measured"], mem["estimated"]
    assert set(measured) == set(planned) == {"vision", "sample", "update", "eval"}
    for phase in ("sample", "update", "eval"):
        assert abs(measured[phase] / planned[phase] - 1) < 0.2, (phase, measured, planned)
    assert abs(max(measured.values()) / max(planned.values()) - 1) < 0.2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_gb"] > 0.1 and r["kept_groups"] == 2 for r in rows if r["phase"] == "grpo")


def test_editor_parts_count_t5_wo_outside_nf4():
    """transformers keeps T5's feed-forward output projections (`wo`, its `_keep_in_fp32_modules`) out of 4-bit, and
    in bf16 for a bf16 load: T5-XXL's encoder is about 3.9 GB, not the 2.5 GB of every Linear in NF4."""
    parts = memory.editor_parts()
    (t5,) = [v for k, v in parts.items() if k.startswith("T5-XXL")]
    assert 3.8 * GB < t5 < 4.4 * GB


def test_a_numbered_cuda_device_is_planned_as_cuda():
    """--device=cuda:0 is a GPU too: bf16 weights and 8-bit optimizer state, as for "cuda"."""
    from train import parse_args
    cfg = parse_args(["--preset=gpu24", "--dry_run=True"])
    config = memory.planner_config(memory.QWEN_7B)
    cuda0, cuda, cpu = (memory.estimate(cfg, config, 400, d)["parts"] for d in ("cuda:0", "cuda", "cpu"))
    assert cuda0 == cuda != cpu


def test_choosing_a_gpu_turns_off_cudnn_attention(monkeypatch):
    """cuDNN's attention backward gives NaN gradients for a fully masked query row (left padding): seen on an H200 in
    tiny_vl's cold start. Choosing a CUDA device turns that kernel off for the run; a CPU run leaves it alone."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert memory.pick_device("cpu", "float32") == ("cpu", torch.float32, "asked for")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert memory.pick_device("cuda", "float32")[:2] == ("cuda", torch.float32)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
