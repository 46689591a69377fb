import json
import math

import pytest
import torch

from train import Config, PRESETS, evaluate, parse_args


def test_overrides_and_presets(capsys):
    cfg = parse_args(["--preset=tiny", "--lora_r=2", "--temperature=1", "--lora_targets=['q_proj']", "--out_dir=x/y"])
    assert (cfg.preset, cfg.lora_r, cfg.temperature, cfg.lora_targets, cfg.out_dir) == \
        ("tiny", 2, 1.0, ("q_proj",), "x/y")
    assert cfg.group_size == PRESETS["tiny"]["group_size"]  # from the preset
    assert "override: lora_r = 2" in capsys.readouterr().out
    from train import detect_preset
    assert parse_args([]) == Config(preset=detect_preset()[0])  # auto: what this machine is meant for
    assert f"preset: {detect_preset()[0]} (" in capsys.readouterr().out


def test_auto_preset_needs_the_gpu24_planner_at_hand(tmp_path, monkeypatch):
    """A 24 GB GPU alone does not make gpu24 the default: its planner must be cached or the hub reachable."""
    from types import SimpleNamespace

    from huggingface_hub import constants

    from train import detect_preset
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="RTX 4090",
                                                                                        total_memory=24 * 2**30))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    preset, why = detect_preset()
    assert preset == "cpu" and "not in the Hugging Face cache and HF_HUB_OFFLINE=1" in why
    assert "huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct" in why
    snap = tmp_path / "models--Qwen--Qwen2.5-VL-7B-Instruct" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    (snap / "config.json").write_text("{}")
    assert detect_preset()[0] == "cpu"  # a config without weights is not a planner
    (snap / "model.safetensors.index.json").write_text("{}")
    preset, why = detect_preset()
    assert preset == "gpu24" and "in the Hugging Face cache" in why
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="T4",
                                                                                        total_memory=16 * 2**30))
    assert detect_preset() == ("cpu", "T4 has 16 GB, gpu24 needs 20")


@pytest.mark.parametrize("argv,msg", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--lora_r=x"], "config key 'lora_r' wants int, got 'x'"),
    (["--lora_r=2.5"], "config key 'lora_r' wants int"),
    (["--preset=big"], "unknown preset 'big'"),
    (["lora_r=2"], "arguments are --key=value"),
])
def test_bad_overrides(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        parse_args(argv)


def test_evaluate_scores_heldout(tiny):
    from data import make_split
    cfg = parse_args(["--preset=tiny"])
    samples = make_split("test", 3)
    scores, texts = evaluate(tiny, samples, cfg)
    assert len(texts) == 3
    assert set(scores) == {"format", "f1_action", "f1_subject", "f1_goal", "f1", "reward"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


# ---- the RL math on toy tensors

from train import group_advantages, grpo_loss, lr_factor, main  # noqa: E402


def test_advantages_zero_mean_per_group():
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]])  # (B=3, G=4)
    adv, signal = group_advantages(rewards)
    assert adv.shape == (3, 4) and signal.tolist() == [True, False, True]
    assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: no signal
    assert adv[0, 1] > 0 > adv[0, 0] and torch.allclose(adv[0].std(), torch.tensor(1.0), atol=1e-3)


def test_near_equal_rewards_carry_no_signal():
    """Eight identical plans judged in bf16 differ in the last bits; that noise must not become +-1 advantages."""
    noise = torch.tensor([[0.7, 0.7001, 0.6999, 0.7, 0.70004, 0.7, 0.69996, 0.7]])
    adv, signal = group_advantages(noise, tol=1e-3)
    assert not signal.any() and torch.equal(adv, torch.zeros(1, 8))
    adv, signal = group_advantages(noise + torch.tensor([0.0] * 7 + [0.01]), tol=1e-3)  # a real difference
    assert signal.all() and adv[0, -1] > 2


def toy(N=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, T, generator=g) - 0.1).requires_grad_()
    mask = torch.ones(N, T)
    mask[0, 3:] = 0  # a short completion: padding after it
    return logp, mask


def test_loss_zero_without_advantage_and_kl():
    logp, mask = toy()
    loss, kl = grpo_loss(logp, logp.detach(), logp.detach() - 0.3, torch.zeros(3), mask, beta=0.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_loss_gradient_is_policy_gradient_and_masked():
    logp, mask = toy()
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, beta=0.0)
    loss.backward()
    # d loss / d logp[n, t] = -adv[n] / (tokens of n) / N at real tokens, 0 at padding
    want = -(adv[:, None] / mask.sum(1, keepdim=True)) / 3 * mask
    assert torch.allclose(logp.grad, want, atol=1e-6)
    assert torch.equal(logp.grad[0, 3:], torch.zeros(2))  # padding gets no gradient


def test_clipping_stops_gradient_outside_trust_region():
    logp, mask = toy()
    adv = torch.tensor([1.0, 1.0, -1.0])
    old = logp.detach().clone()
    old[0] -= 0.5   # ratio e^0.5 > 1.2 with a positive advantage: clipped
    old[1] += 0.01  # ratio just below 1: inside the region
    old[2] += 0.5   # ratio e^-0.5 < 0.8 with a negative advantage: clipped
    loss, _ = grpo_loss(logp, old, logp.detach(), adv, mask, clip=0.2, beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad[0], torch.zeros(5)) and torch.equal(logp.grad[2], torch.zeros(5))
    assert (logp.grad[1] != 0).all()


def test_kl_zero_against_itself_and_positive_otherwise():
    logp, mask = toy()
    _, kl = grpo_loss(logp, logp.detach(), logp.detach(), torch.zeros(3), mask, beta=0.1)
    assert kl.item() == 0.0
    _, kl = grpo_loss(logp, logp.detach(), logp.detach() - 0.5, torch.zeros(3), mask, beta=0.1)
    assert kl.item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-5)


def test_kl_zero_with_adapter_disabled(tiny_dir):
    """The reference is the policy with LoRA off; with LoRA B = 0 (fresh) both are the same model."""
    from agents import load_planner
    from rollout import build_prompt, completion_logp, sample_group, stop_ids
    p = load_planner("tiny", folder=tiny_dir)
    prompts = [build_prompt(p.tok, "blur the background")]
    r = sample_group(p.policy, prompts, 2, 6, stop_ids(p.tok), p.tok.pad_token_id, generator=torch.Generator())
    with torch.no_grad(), p.policy.disable_adapter():
        ref = completion_logp(p.policy, prompts, r.ids, r.mask, p.tok.pad_token_id, 2)
    logp = completion_logp(p.policy, prompts, r.ids, r.mask, p.tok.pad_token_id, 2)
    _, kl = grpo_loss(logp, logp.detach(), ref, torch.zeros(2), r.mask)
    assert kl.item() < 1e-6
    for m in p.policy.modules():  # now move the adapter: the KL must see it
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    logp = completion_logp(p.policy, prompts, r.ids, r.mask, p.tok.pad_token_id, 2)
    assert grpo_loss(logp, logp.detach(), ref, torch.zeros(2), r.mask)[1].item() > 1e-3


def test_kl_stays_finite_for_a_forced_token():
    """A token the policy's full distribution finds nearly impossible (log-prob -1000: one the plan grammar forced)
    must not make the k3 KL, exp(ref_logp - logp) - ..., inf."""
    logp, mask = torch.tensor([[-0.5, -1000.0, -0.5]], requires_grad=True), torch.ones(1, 3)
    ref = torch.full((1, 3), -0.5)
    loss, kl = grpo_loss(logp, logp.detach(), ref, torch.ones(1), mask, beta=0.1)
    assert math.isfinite(kl.item()) and math.isfinite(loss.item()) and kl.item() > 1
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_lr_schedule():
    assert lr_factor(0, 4, 20) == 0.25 and lr_factor(3, 4, 20) == 1.0
    assert lr_factor(4, 4, 20) == 1.0 and lr_factor(20, 4, 20) == pytest.approx(0.1)


# ---- whole runs on the tiny preset

def fake_rewards(texts, golds):
    """A reward with signal for a random tiny model: the share of lower-case letters in the completion."""
    r = torch.tensor([sum(c.islower() for c in t) / max(len(t), 1) for t in texts])
    return r, {"format": torch.zeros_like(r), "f1": r, "f1_action": r, "f1_subject": r, "f1_goal": r}


def run(tmp_path, monkeypatch, name, *extra):
    import reward
    monkeypatch.setattr(reward, "paper_rewards", fake_rewards)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = parse_args(["--preset=tiny", f"--out_dir={tmp_path / name}", *extra])
    main(cfg)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "grpo"], rows


def test_resume_replays_the_same_run(tmp_path, monkeypatch):
    full, full_rows = run(tmp_path, monkeypatch, "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert all(r["kept_groups"] > 0 for r in full)  # the fake reward gives every group a signal: real updates
    assert all(0 < r["sample_seconds"] < r["seconds"] for r in full)

    import train
    real_save = train.save_checkpoint

    def save_then_die(out, policy, opt, sched, step):  # a kill right after the step-2 checkpoint
        real_save(out, policy, opt, sched, step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, monkeypatch, "split")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed, rows = run(tmp_path, monkeypatch, "split", "--resume=True")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("reward", "loss", "kl", "grad_norm", "tokens"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key
    evals = [(r["phase"], r["step"], r["reward"]) for r in rows if r["phase"].startswith("eval")]
    assert evals == [(r["phase"], r["step"], r["reward"]) for r in full_rows if r["phase"].startswith("eval")]
    assert ("eval", 2) in [e[:2] for e in evals]  # the evaluation logged just before the kill is kept
    out = tmp_path / "split"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "reward.png").stat().st_size > 1000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resume"] is True and "git_commit" in cfg and "torch" in cfg


def test_adapter_loads_with_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run(tmp_path, monkeypatch, "r")
    from agents import load_planner
    trained = torch.load(tmp_path / "r" / "state.pt", weights_only=False)["lora"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "cache" / "imageedit-r1" / "tiny-llama")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "r" / "adapter")
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in loaded)
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)  # trained, not the zero init


def test_eval_adapter_reproduces_the_run(tmp_path, monkeypatch):
    """The saved adapter, loaded through PeftModel.from_pretrained, scores what the run logged at its end."""
    _, rows = run(tmp_path, monkeypatch, "e")
    final = [r for r in rows if r["phase"] == "eval"][-1]
    cfg = parse_args(["--preset=tiny", f"--eval_adapter={tmp_path / 'e' / 'adapter'}"])
    scores = main(cfg)
    assert scores == {k: v for k, v in final.items() if k not in ("phase", "step")}
    with pytest.raises(SystemExit, match="is not an adapter folder"):
        main(parse_args(["--preset=tiny", f"--eval_adapter={tmp_path}"]))


def test_refuses_to_overwrite_and_bad_resume(tmp_path, monkeypatch):
    run(tmp_path, monkeypatch, "a")
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path, monkeypatch, "a")
    with pytest.raises(SystemExit, match="state.pt does not exist"):
        run(tmp_path, monkeypatch, "b", "--resume=True")
    with pytest.raises(SystemExit, match="more than 10% of train_n"):
        run(tmp_path, monkeypatch, "c", "--sft_n=30")


def test_non_finite_loss_stops_with_message(tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(train, "grpo_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True),
                                                             torch.tensor(0.0)))
    with pytest.raises(SystemExit, match="non-finite loss 3 steps in a row"):
        run(tmp_path, monkeypatch, "nan", "--steps=5", "--max_bad_steps=3")


def test_non_finite_gradient_skips_the_step(tmp_path, monkeypatch):
    """A finite loss with an inf gradient norm (bf16 overflow) must not reach opt.step(): the LoRA weights stay as
    they were, the run stops after max_bad_steps with a message, and the memory meter's thread is ended."""
    import threading

    import train
    loaded, load = [], train.load_policy
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, m: real_clip(params, m) * float("inf"))
    threads = threading.active_count()
    with pytest.raises(SystemExit, match="non-finite gradient norm \\(inf\\) 2 steps in a row"):
        run(tmp_path, monkeypatch, "inf", "--steps=3", "--max_bad_steps=2", "--save_every=1")
    assert threading.active_count() == threads  # no sampling thread left behind
    rows = [json.loads(x) for x in (tmp_path / "inf" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["phase"] == "grpo"]  # no step was taken, none logged as one
    state = torch.load(tmp_path / "inf" / "state.pt", weights_only=False)  # after the cold start, before GRPO
    now = {k: v for k, v in loaded[0].policy.state_dict().items() if "lora_" in k}
    assert state["step"] == 0 and all(torch.equal(state["lora"][k], v) for k, v in now.items())


def test_trains_on_a_dataset_folder(tmp_path, monkeypatch):
    from data import DataError, make_split, write_folder
    write_folder(make_split("train", 40), tmp_path / "mine")
    grpo, rows = run(tmp_path, monkeypatch, "f", f"--train_dir={tmp_path / 'mine'}", f"--eval_dir={tmp_path / 'mine'}")
    assert len(grpo) == 4 and rows[0]["phase"] == "eval zero-shot"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no metadata.jsonl"):
        run(tmp_path, monkeypatch, "g", f"--train_dir={tmp_path / 'empty'}")
    (tmp_path / "nolabels").mkdir()
    (tmp_path / "nolabels" / "metadata.jsonl").write_text('{"file_name": "a.png", "instruction": "blur it"}\n')
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "nolabels" / "a.png")
    with pytest.raises(DataError, match="a.png has no action/subject/goal labels"):
        run(tmp_path, monkeypatch, "h", f"--eval_dir={tmp_path / 'nolabels'}")


def test_sigkill_between_checkpoints_loses_nothing_checkpointed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--preset=tiny", f"--out_dir={out}", "--steps=40", "--save_every=3",
           "--eval_every=100"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "state.pt").exists() and torch.load(out / "state.pt", weights_only=False)["step"] >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(out / "state.pt", weights_only=False)  # complete and loadable, whatever moment the kill hit
    assert state["step"] % 3 == 0 and state["step"] >= 3
    assert (out / "adapter" / "adapter_config.json").exists()
    subprocess.run(cmd + ["--resume=True"], cwd=root, env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "grpo"] == list(range(1, 41))  # each step logged exactly once


def test_prompts_carry_the_perception_text(tiny, monkeypatch):
    """Each distinct image is described once, and the description reaches the planner's prompt."""
    import regions
    import rollout
    from data import make_split
    from train import describe_images
    seen = []
    monkeypatch.setattr(regions, "describe", lambda img: seen.append(img.shape) or f"{img.shape[0]}px scene")
    samples = make_split("test", 12)
    describe_images(samples)
    assert len(seen) == len({s["image"] for s in samples}) and set(seen) == {(512, 512, 3)}
    assert all(s["description"] == "512px scene" for s in samples)
    prompts, sample = [], rollout.sample_group
    monkeypatch.setattr(rollout, "sample_group",
                        lambda model, ps, *a, **k: prompts.extend(ps) or sample(model, ps, *a, **k))
    rollout.greedy_plans(tiny, ["blur it"], 2, descriptions=["512px scene"])
    assert "Image: 512px scene\nRequest: blur it" in tiny.tok.decode(prompts[0])
