"""Shared fixtures. Planners are loaded once per session; tests that train load their own copy."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail at once, not retry for a minute


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from planner import tiny_folder
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from planner import load_planner
    return load_planner("tiny", folder=tiny_dir)


@pytest.fixture(scope="session")
def smol():
    from planner import load_planner
    return load_planner("cpu")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_dir, tmp_path_factory):
    """A saved LoRA adapter of the tiny planner that changes its outputs (a fresh one is a no-op: B = 0)."""
    import torch

    from planner import load_planner
    p = load_planner("tiny", folder=tiny_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in p.policy.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    folder = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    p.policy.save_pretrained(folder)
    return folder
