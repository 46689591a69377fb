"""
GRPO on an emulated GPU (fake_gpu: tensors on device "fakegpu" that raise, as CUDA does, when a CPU tensor joins
their math). Registering the device is process-wide, so tests/test_device.py runs this file in its own pytest
process; it is not collected by `make test` itself (the name does not start with test_).

Covered: train.main end to end on the device (cold start, sampling with the KV cache, every reward's tensors
meeting the log-probs in the loss, backward, optimizer, evaluation, checkpoint and resume), for the text planner
and the Qwen2.5-VL planner (vision features, 3-D positions, the judge). Not covered: 4-bit (bitsandbytes cannot
wrap these tensors, so the planner runs unquantized), bf16, CUDA-only libraries (paged 8-bit AdamW), memory.
"""
import json

import fake_gpu

fake_gpu.install()

import pytest  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402


def signal_rewards(texts, golds):
    """A reward with a signal for a random tiny model (it writes no tags): the share of lower-case letters."""
    r = torch.tensor([sum(c.islower() for c in t) / max(len(t), 1) for t in texts])
    return r, {"format": torch.zeros_like(r), "f1": r, "f1_action": r, "f1_subject": r, "f1_goal": r}


def run(tmp_path, monkeypatch, *args):
    """train.main on the emulated device; returns (the planner it trained, its GRPO rows). The paper reward is
    `signal_rewards`; the others are shown a runnable plan for every other sample, so they have plans to run."""
    import reward
    plan, loaded = reward.format_plan(["brighten"], ["whole image"], ["strongly"]), []

    def make_reward(cfg, planner):
        loaded.append(planner)
        if cfg.reward == "paper":
            return signal_rewards
        score = reward.make_reward(cfg, planner)
        return lambda texts, samples: score([plan if i % 2 else t for i, t in enumerate(texts)], samples)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train.main(train.parse_args(["--device=fakegpu", "--quantize=False", "--steps=2", "--eval_every=2",
                                 "--save_every=1", "--sft_steps=1", f"--out_dir={out}", *args]), make_reward)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return loaded[-1], [r for r in rows if r["phase"] == "grpo"]


def test_the_emulated_device_enforces_cudas_rule():
    x = torch.randn(3, 4).to("fakegpu")
    assert x.device.type == "fakegpu" and (x * torch.tensor(2.0)).device.type == "fakegpu"  # a CPU scalar may join
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        x * torch.ones(3, 1)
    # the defect this file guards against: rewards made on the CPU meeting log-probs on the device in the loss
    logp = torch.randn(2, 5).to("fakegpu")
    with pytest.raises(RuntimeError, match="same device"):
        train.grpo_loss(logp, logp, logp, torch.ones(2), torch.ones(2, 5).to("fakegpu"))


@pytest.mark.parametrize("reward", ["paper", "both"])  # both: the outcome reward's tensor joins the paper's
def test_grpo_on_the_device(tmp_path, monkeypatch, reward):
    planner, rows = run(tmp_path, monkeypatch, "--preset=tiny", f"--reward={reward}")
    assert {p.device.type for p in planner.policy.parameters()} == {"fakegpu"}
    assert [r["step"] for r in rows] == [1, 2] and all(r["kept_groups"] > 0 for r in rows)  # real updates
    assert all(r["grad_norm"] > 0 for r in rows)
    lora = torch.load(tmp_path / "run" / "state.pt", weights_only=False)["lora"]
    assert all(v.device.type == "cpu" for v in lora.values())  # a checkpoint loads on any machine
    # resume from the step-1 checkpoint... on the device, one step further
    planner, rows = run(tmp_path, monkeypatch, "--preset=tiny", f"--reward={reward}", "--steps=3", "--resume=True")
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("reward", ["paper", "judge"])
def test_vlm_grpo_on_the_device(tmp_path, monkeypatch, reward):
    planner, rows = run(tmp_path, monkeypatch, "--preset=tiny_vl", f"--reward={reward}", "--eval_judge=True")
    assert {p.device.type for p in planner.policy.parameters()} == {"fakegpu"}
    assert [r["step"] for r in rows] == [1, 2] and all(r["kept_groups"] > 0 for r in rows)
    if reward == "judge":
        assert all(r["completion"] > 0 for r in rows)  # the judge scored the runnable plans
