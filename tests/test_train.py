import json
import math
import os
import re
import shutil
from dataclasses import fields

import pytest
import torch

import gpu_check
from config import PRESETS, Config
from train import evaluate, parse_args


def test_overrides_and_presets(capsys):
    cfg = parse_args(["--preset=tiny", "--lora_r=2", "--temperature=1", "--lora_targets=['q_proj']", "--out_dir=x/y"])
    assert (cfg.preset, cfg.lora_r, cfg.temperature, cfg.lora_targets, cfg.out_dir) == \
        ("tiny", 2, 1.0, ("q_proj",), "x/y")
    assert cfg.group_size == PRESETS["tiny"]["group_size"]  # from the preset
    assert "override: lora_r = 2" in capsys.readouterr().out
    from config import detect_preset
    assert parse_args([]) == Config(preset=detect_preset()[0])  # auto: what this machine is meant for
    assert f"preset: {detect_preset()[0]} (" in capsys.readouterr().out


def test_auto_preset_needs_the_gpu24_planner_at_hand(tmp_path, monkeypatch):
    """A 24 GB GPU alone does not make gpu24 the default: its planner must be cached or the hub reachable."""
    from types import SimpleNamespace

    from huggingface_hub import constants

    from config import detect_preset
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


@pytest.mark.parametrize("arg,msg", [
    ("--lr=-1", "lr=-1.0 is out of range; allowed: a finite number > 0"),
    ("--lr=1e999", "lr=inf is out of range; allowed: a finite number > 0"),
    ("--batch_prompts=0", "batch_prompts=0 is out of range; allowed: an int >= 1"),
    ("--group_size=1", "group_size=1 is out of range; allowed: an int >= 2"),
    ("--temperature=0", "temperature=0.0 is out of range; allowed: a finite number > 0"),
    ("--top_p=1.5", r"top_p=1.5 is out of range; allowed: a number in \(0, 1\]"),
    ("--outcome_mix=-0.1", r"outcome_mix=-0.1 is out of range; allowed: a number in \[0, 1\]"),
    ("--lora_dropout=1", r"lora_dropout=1.0 is out of range; allowed: a number in \[0, 1\)"),
    ("--outcome_weights=(1, 2)", r"outcome_weights=\(1, 2\) is out of range; allowed: 3 weights >= 0"),
    ("--outcome_weights=(0, 0, 0)", r"outcome_weights=\(0, 0, 0\) is out of range; allowed: 3 weights >= 0, not all"),
    ("--reward=magic", "reward='magic' is out of range; allowed: paper, edits, outcome, both or judge"),
    ("--sft_n=0", "sft_n=0 is out of range; allowed: >= 1 with sft_steps=2"),
    ("--seed=-1", "seed=-1 is out of range; allowed: an int >= 0"),
    ("--eval_every=0", "eval_every=0 is out of range; allowed: an int >= 1"),
    ("--beta=-0.1", "beta=-0.1 is out of range; allowed: a finite number >= 0"),
    ("--device=tpu", "device='tpu' is out of range; allowed: auto, cpu, cuda or cuda:N"),
    ("--max_pixels=100", "max_pixels=100 is out of range; allowed: an int >= 784"),
    ("--lora_targets=()", r"lora_targets=\(\) is out of range; allowed: a non-empty tuple"),
    ("--planner=org/model", "planner='org/model' is out of range; allowed: '' with preset tiny"),
])
def test_settings_out_of_range_are_refused(arg, msg):
    """Each error names the field, its value and the allowed range, at parse time: before anything loads."""
    with pytest.raises(SystemExit, match=msg):
        parse_args(["--preset=tiny", arg])


def test_bad_settings_stop_before_anything_loads_or_is_written(tmp_path, monkeypatch):
    import train
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the planner was loaded"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="batch_prompts=0 is out of range"):
        main(parse_args(["--preset=tiny", f"--out_dir={out}", "--batch_prompts=0"]))
    cfg = parse_args(["--preset=tiny", f"--out_dir={out}"])
    cfg.lr = -1.0  # a Config changed in code: main checks it too
    with pytest.raises(SystemExit, match="lr=-1.0 is out of range"):
        main(cfg)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field_with_its_default_and_comment(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset=tiny", flag])
    assert e.value.code in (0, None)  # exit status 0
    out = capsys.readouterr().out
    assert all(f"  --{f.name}=" in out for f in fields(Config))
    assert re.search(r"\n  --group_size=8 +G completions per prompt\n", out)  # Config's defaults, not the preset's
    assert re.search(r"\n  --lr=0.0003 +GRPO learning rate \(the paper's 1e-6 is for full 7B weights", out)
    assert re.search(r"\n +editor reads \(rollouts, evaluation and edit.py alike\)\n", out)  # a comment's 2nd line
    assert "\n# supervised cold start (the tag format and a first reading of requests, on a small labelled share)\n" \
        in out and "python train.py --preset=tiny --steps=4" in out


def test_evaluate_scores_heldout(tiny):
    from phrasings import make_split
    cfg = parse_args(["--preset=tiny"])
    samples = make_split("test", 3)
    scores, texts = evaluate(tiny, samples, cfg)
    assert len(texts) == 3
    assert set(scores) == {"format", "f1_action", "f1_subject", "f1_goal", "f1", "edit_f1", "edit_count", "reward"}
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
    from planner import load_planner
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

# A reward with signal for a random tiny model: the share of lower-case letters in the completion.
fake_rewards = gpu_check.lower_share(None, None)


def run(tmp_path, monkeypatch, name, *extra, planners=None):
    """A tiny run with `fake_rewards` (given to main as its reward); `planners` gets the run's planner."""
    def make_reward(cfg, planner):
        if planners is not None:
            planners.append(planner)
        return fake_rewards
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = parse_args(["--preset=tiny", f"--out_dir={tmp_path / name}", *extra])
    main(cfg, make_reward)
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


def test_resume_checks_its_settings_against_the_run(tmp_path, monkeypatch, capsys):
    """--resume=True with a setting that changes the model or the data is refused, every differing field listed,
    before config.json is touched; settings that may change are printed, take effect and are recorded."""
    from train import lr_factor
    run(tmp_path, monkeypatch, "a", "--steps=2")
    out = tmp_path / "a"
    saved = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match="settings that differ from") as e:
        run(tmp_path, monkeypatch, "a", "--steps=2", "--resume=True", "--lora_r=8", "--seed=1")
    assert "lora_r: saved 4, now 8" in str(e.value) and "seed: saved 0, now 1" in str(e.value)
    assert (out / "config.json").read_text() == saved
    capsys.readouterr()
    grpo, _ = run(tmp_path, monkeypatch, "a", "--resume=True", "--steps=3", "--lr=0.005")
    printed = capsys.readouterr().out
    assert "resume: steps 2 -> 3" in printed and "resume: lr 0.01 -> 0.005" in printed
    assert [r["step"] for r in grpo] == [1, 2, 3]
    assert grpo[-1]["lr"] == pytest.approx(0.005 * lr_factor(3, 3, 3))  # the new lr, not the checkpoint's
    cfg, first = json.loads((out / "config.json").read_text()), json.loads(saved)
    assert (cfg["steps"], cfg["lr"], cfg["resume"]) == (3, 0.005, True)
    assert (cfg["git_commit"], cfg["torch"]) == (first["git_commit"], first["torch"])  # the run's start
    assert cfg["resumes"][0]["changed"] == {"steps": [2, 3], "lr": [0.01, 0.005]}
    assert "git_commit" in cfg["resumes"][0]
    state = torch.load(out / "state.pt", weights_only=True)  # a checkpoint that lacks a LoRA weight
    key = sorted(state["lora"])[0]
    del state["lora"][key]
    torch.save(state, out / "state.pt")
    with pytest.raises(SystemExit, match=f"does not fit this planner's LoRA adapter: 1 missing \\(first: {key}"):
        run(tmp_path, monkeypatch, "a", "--resume=True", "--steps=4")


class Payload:  # a class a checkpoint would need to load: unpickling it may run code
    pass


def checkpoint_parts(tiny_dir, r=4, bits8=False):
    """A tiny policy with a LoRA adapter of rank r, its optimizer (bitsandbytes' 8-bit one, as on a GPU, or
    AdamW) after two steps, and the scheduler."""
    from planner import load_planner
    from train import lr_factor
    policy = load_planner("tiny", folder=tiny_dir, lora_r=r, lora_alpha=2 * r).policy
    params = [p for p in policy.parameters() if p.requires_grad]
    if bits8:
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-2, weight_decay=0.0, min_8bit_size=64)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, 10))
    for _ in range(2):
        sum((p ** 2).sum() + p.sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return policy, opt, sched


@pytest.mark.parametrize("bits8", [False, True])
def test_checkpoint_loads_with_weights_only(tiny_dir, tmp_path, bits8):
    """state.pt holds tensors and plain values only: the LoRA weights, the optimizer state (AdamW, or the GPU's
    8-bit paged AdamW), the scheduler and the RNG all come back through torch.load(weights_only=True)."""
    from train import load_checkpoint, save_checkpoint
    policy, opt, sched = checkpoint_parts(tiny_dir, bits8=bits8)
    save_checkpoint(tmp_path, policy, opt, sched, 2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state) == {"step", "lora", "opt", "sched", "rng"} and state["opt"]["state"]
    again, opt2, sched2 = checkpoint_parts(tiny_dir, bits8=bits8)
    assert load_checkpoint(tmp_path, again, opt2, sched2) == 2
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert str(opt2.state_dict()) == str(opt.state_dict())


def test_load_checkpoint_refuses_what_does_not_fit(tiny_dir, tmp_path):
    """weights_only=True: a state.pt that needs a class to load is refused. LoRA weights are checked key by key and
    shape by shape: load_state_dict(strict=False) alone would skip a missing one silently."""
    from train import load_checkpoint, save_checkpoint
    policy, opt, sched = checkpoint_parts(tiny_dir)
    save_checkpoint(tmp_path, policy, opt, sched, 3)
    assert load_checkpoint(tmp_path, policy, opt, sched) == 3
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    torch.save({**state, "note": Payload()}, tmp_path / "state.pt")
    with pytest.raises(SystemExit, match=r"cannot load .*state.pt \(UnpicklingError"):
        load_checkpoint(tmp_path, policy, opt, sched)
    key = sorted(state["lora"])[0]
    fewer, more = {k: v for k, v in state["lora"].items() if k != key}, {**state["lora"], "x.lora_A": torch.zeros(1)}
    for lora, msg in [(fewer, f"1 missing \\(first: {key}\\)"), (more, r"1 unexpected \(first: x.lora_A\)")]:
        torch.save({**state, "lora": lora}, tmp_path / "state.pt")
        with pytest.raises(SystemExit, match="does not fit this planner's LoRA adapter: " + msg):
            load_checkpoint(tmp_path, policy, opt, sched)
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(SystemExit, match=f"does not fit this planner's LoRA adapter: {len(state['lora'])} of another"):
        load_checkpoint(tmp_path, *checkpoint_parts(tiny_dir, r=8))


def test_save_checkpoint_clears_what_a_kill_left(tiny_dir, tmp_path):
    from train import save_checkpoint
    policy, opt, sched = checkpoint_parts(tiny_dir)
    save_checkpoint(tmp_path, policy, opt, sched, 1)
    # killed inside rmtree(.adapter.old), with half-written temporary files: every later save used to fail
    shutil.copytree(tmp_path / "adapter", tmp_path / ".adapter.old")
    (tmp_path / ".adapter.old" / "adapter_config.json").unlink()
    (tmp_path / ".adapter.tmp").mkdir()
    (tmp_path / ".adapter.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "state.pt.tmp").write_bytes(b"half")
    save_checkpoint(tmp_path, policy, opt, sched, 2)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "state.pt"]
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    # killed between the two renames: no adapter/, the complete previous one in .adapter.old; it is put back
    os.replace(tmp_path / "adapter", tmp_path / ".adapter.old")
    from train import tidy_checkpoint
    tidy_checkpoint(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "state.pt"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_adapter_loads_with_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run(tmp_path, monkeypatch, "r")
    from planner import load_planner
    trained = torch.load(tmp_path / "r" / "state.pt", weights_only=True)["lora"]
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
    (scores,) = main(cfg)
    assert scores == {**final, "phase": "eval adapter", "step": 0}
    with pytest.raises(SystemExit, match="is not an adapter folder"):
        main(parse_args(["--preset=tiny", f"--eval_adapter={tmp_path}"]))


def test_refuses_to_overwrite_and_bad_resume(tmp_path, monkeypatch):
    run(tmp_path, monkeypatch, "a")
    with pytest.raises(SystemExit, match="already holds a run"):
        run(tmp_path, monkeypatch, "a")
    with pytest.raises(SystemExit, match="state.pt does not exist"):
        run(tmp_path, monkeypatch, "b", "--resume=True")
    with pytest.raises(SystemExit, match="sft_n=30 is out of range; allowed: at most 10% of train_n=40, 4"):
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

    loaded = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, m: real_clip(params, m) * float("inf"))
    threads = threading.active_count()
    with pytest.raises(SystemExit, match="non-finite gradient norm \\(inf\\) 2 steps in a row"):
        run(tmp_path, monkeypatch, "inf", "--steps=3", "--max_bad_steps=2", "--save_every=1", "--sft_steps=0",
            planners=loaded)
    assert threading.active_count() == threads  # no sampling thread left behind
    rows = [json.loads(x) for x in (tmp_path / "inf" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["phase"] == "grpo"]  # no step was taken, none logged as one
    state = torch.load(tmp_path / "inf" / "state.pt", weights_only=True)  # after the cold start, before GRPO
    now = {k: v for k, v in loaded[0].policy.state_dict().items() if "lora_" in k}
    assert state["step"] == 0 and all(torch.equal(state["lora"][k], v) for k, v in now.items())


def test_non_finite_gradient_in_the_cold_start_skips_the_step(tmp_path, monkeypatch, capsys):
    """The cold start is guarded as GRPO is: a step whose gradient norm is not finite leaves the weights as they were
    (peft's fresh lora_B is zero; any optimizer step moves it), and max_bad_steps in a row stop the run."""
    import coldstart
    planners, real_sft, real_clip = [], coldstart.sft, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(coldstart, "sft", lambda p, *a, **k: (planners.append(p), real_sft(p, *a, **k)))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, m: real_clip(params, m) * float("inf"))
    with pytest.raises(SystemExit, match="cold start: non-finite loss or gradient 2 steps in a row; lower sft_lr"):
        run(tmp_path, monkeypatch, "sft", "--sft_steps=3", "--max_bad_steps=2")
    out = capsys.readouterr().out
    assert out.count("non-finite gradient norm (inf), step skipped") == 2 and "sft 3/3" not in out
    lora_b = [p for n, p in planners[0].policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(not p.any() for p in lora_b)


def test_trains_on_a_dataset_folder(tmp_path, monkeypatch):
    from data import DataError, write_folder
    from phrasings import make_split
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


def test_bad_data_is_refused_before_the_planner_loads(tmp_path, monkeypatch):
    """A missing folder, a broken metadata.jsonl, an unknown action or too few requests for a batch: reported
    before the planner loads and before the run folder (config.json) is written."""
    import train
    from data import DataError, write_folder
    from phrasings import make_split
    monkeypatch.setattr(train, "load_policy", lambda *a, **k: pytest.fail("the planner was loaded first"))

    def folder(name, n, edit=None):
        root = write_folder(make_split("train", n), tmp_path / name)
        rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
        lines = [json.dumps(edit(r) if edit and i == 1 else r) for i, r in enumerate(rows)]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        return root

    broken = folder("broken", 3)
    with open(broken / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "img/0000.png", "instruction": \n')
    teleport = folder("teleport", 3, lambda r: {**r, "action": ["teleport"] + r["action"][1:]})
    out = tmp_path / "run"
    for args, msg in [([f"--train_dir={tmp_path / 'nowhere'}"], "dataset folder .*nowhere does not exist"),
                      ([f"--eval_dir={broken}"], "metadata.jsonl:4: invalid JSON"),
                      ([f"--train_dir={teleport}"], "metadata.jsonl:2: unknown action 'teleport'; the actions are "
                                                    "brighten, darken"),
                      ([f"--train_dir={folder('small', 3)}", "--batch_prompts=4"],
                       r"3 train requests .*at least 4 are needed \(batch_prompts\)")]:
        with pytest.raises(DataError, match=msg):
            main(parse_args(["--preset=tiny", f"--out_dir={out}", *args]))
        assert not out.exists()


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
            if (out / "state.pt").exists() and torch.load(out / "state.pt", weights_only=True)["step"] >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(out / "state.pt", weights_only=True)  # complete and loadable, whatever moment the kill hit
    assert state["step"] % 3 == 0 and state["step"] >= 3
    assert (out / "adapter" / "adapter_config.json").exists()
    subprocess.run(cmd + ["--resume=True"], cwd=root, env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "grpo"] == list(range(1, 41))  # each step logged exactly once


def test_prompts_carry_the_perception_text(tiny, monkeypatch):
    """Each distinct image is described once, and the description reaches the planner's prompt."""
    import agents
    import regions
    import rollout
    from phrasings import make_split
    from regions import describe_requests
    seen = []
    monkeypatch.setattr(regions, "describe", lambda img: seen.append(img.shape) or f"{img.shape[0]}px scene")
    samples = make_split("test", 12)
    describe_requests(samples)
    assert len(seen) == len({s["image"] for s in samples}) and set(seen) == {(512, 512, 3)}
    assert all(s["description"] == "512px scene" for s in samples)
    prompts, sample = [], rollout.sample_group
    monkeypatch.setattr(rollout, "sample_group",
                        lambda model, ps, *a, **k: prompts.extend(ps) or sample(model, ps, *a, **k))
    agents.greedy_plans(tiny, ["blur it"], 2, descriptions=["512px scene"])
    assert "Image: 512px scene\nRequest: blur it" in tiny.tok.decode(prompts[0])


def test_the_perception_agents_are_unloaded_before_training(tmp_path, monkeypatch):
    """The region agents write the perception text, then leave memory (~0.23 GB on the cpu preset) before the
    planner trains: nothing of theirs is loaded when the cold start begins."""
    import registry
    import train
    during, real_describe, real_cold = [], train.describe_requests, train.cold_start
    monkeypatch.setattr(train, "describe_requests", lambda s: (real_describe(s), during.append(registry.loaded()))[0])
    monkeypatch.setattr(train, "cold_start", lambda *a, **k: (during.append(registry.loaded()), real_cold(*a, **k))[1])
    run(tmp_path, monkeypatch, "described", "--describe=True", "--steps=1")
    assert during[0] and during[1] == []


def update_of_four_groups(tiny_dir, *args, checkpointing=False, policy_hook=None):
    """A GRPO update of a tiny planner with a live random adapter on 4 prompts x 3 completions and random rewards,
    with SGD at lr 1; args: --key=value over the tiny preset. Returns (loss, grad norm, the LoRA weights after)."""
    from planner import load_planner
    from rollout import build_prompt, sample_group, stop_ids
    from train import Groups, grpo_update
    torch.manual_seed(0)  # the same LoRA A (drawn at load) and B each time
    p = load_planner("tiny", folder=tiny_dir)
    for name, w in p.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(w, std=0.1)  # a live adapter: the update moves both LoRA matrices
    if checkpointing:
        p.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if policy_hook:
        policy_hook(p.policy)
    pad, params = p.tok.pad_token_id, [q for q in p.policy.parameters() if q.requires_grad]
    prompts = [build_prompt(p.tok, r) for r in ("blur it", "make the cat red", "crop it to a square", "flip")]
    roll = sample_group(p.policy, prompts, 3, 8, stop_ids(p.tok), pad, generator=torch.Generator().manual_seed(0))
    rewards = torch.rand(12, generator=torch.Generator().manual_seed(1))
    adv, signal = group_advantages(rewards.view(4, 3))
    groups = Groups([{}] * 4, prompts, None, roll, rewards, {}, adv, signal.nonzero().flatten().tolist())
    assert len(groups.keep) == 4
    cfg = parse_args(["--preset=tiny", "--group_size=3", *args])
    p.policy.train()
    loss, kl, norm, gap, finite = grpo_update(p.policy, params, torch.optim.SGD(params, lr=1.0), [groups], pad, cfg)
    return loss, norm, [q.detach().clone() for q in params]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_micro_batches_give_the_update_of_one_batch(tiny_dir, checkpointing):
    """grpo_update in micro-batches of one group (the cpu preset's default: its update's peak memory is half of 4's)
    makes the same update as one batch of all groups, with the KV-cached prompts and with the full sequences of
    gradient checkpointing alike."""
    (loss1, norm1, w1), (loss4, norm4, w4) = (
        update_of_four_groups(tiny_dir, f"--micro_groups={m}", "--beta=0.02", checkpointing=checkpointing)
        for m in (1, 4))
    assert norm1 > 0
    assert loss1 == pytest.approx(loss4, abs=1e-5)  # (the logged KL is a mean of micro-batch means: not compared)
    assert norm1 == pytest.approx(norm4, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(w1, w4))


def test_without_kl_the_update_runs_no_reference_pass(tiny_dir):
    """beta=0 (the default) skips the reference pass (the adapter switched off) that only the KL term reads; with
    beta > 0 it runs once per micro-batch and the KL term changes the update."""
    entered = []

    def count(policy):
        off = policy.disable_adapter
        policy.disable_adapter = lambda: entered.append(1) or off()
    runs = {beta: update_of_four_groups(tiny_dir, f"--beta={beta}", "--micro_groups=2", policy_hook=count)
            for beta in (0.0, 0.5)}
    assert len(entered) == 2  # beta=0.5: one reference pass for each of the 2 micro-batches; beta=0: none
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(runs[0.0][2], runs[0.5][2]))


def test_cold_start_in_micro_batches_makes_the_update_of_one_batch(tiny_dir, monkeypatch):
    """sft in backward passes of one request (gradient accumulated) ends with the adapter of one pass over all. With
    SGD: Adam's first steps are about lr * sign(gradient), which turns rounding noise on near-zero gradients into
    whole steps."""
    from phrasings import make_split
    from planner import load_planner
    from coldstart import sft
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr: torch.optim.SGD(params, lr=lr))
    done = []
    for micro in (1, 4):
        torch.manual_seed(0)
        p = load_planner("tiny", folder=tiny_dir)
        for name, w in p.policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(w, std=0.1)  # a live adapter: the update moves both LoRA matrices
        samples = make_split("train", 4, seed=0)
        cfg = parse_args(["--preset=tiny", "--sft_steps=2", "--sft_batch=4", f"--sft_micro={micro}", "--sft_n=4",
                          "--sft_lr=0.1"])
        init = [q.detach().clone() for q in p.policy.parameters() if q.requires_grad]
        sft(p, samples, cfg)
        done.append([q.detach().clone() for q in p.policy.parameters() if q.requires_grad])
    assert all((a - b).abs().max() > 0 for a, b in zip(init, done[1]))  # every LoRA matrix moved
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*done))
