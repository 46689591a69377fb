"""gpu_check.py's code on tiny configs on the CPU: the same functions the GPU run uses, so the script a lent GPU
runs is known to work before it gets there."""
import pytest
import torch

import gpu_check


def test_gpu_check_tiny_runs_both_parts(tmp_path, monkeypatch):
    import bitsandbytes as bnb
    monkeypatch.setenv("GPU_CHECK_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quantized = []
    real = gpu_check.nf4_linears

    def count(module, dtype):
        real(module, dtype)
        quantized.extend(m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit))
    monkeypatch.setattr(gpu_check, "nf4_linears", count)
    r = gpu_check.main(["--tiny", f"--out={tmp_path / 'out'}"])
    planner, flux = r["planner"], r["flux"]
    assert set(planner["measured"]) == {"vision", "sample", "update", "eval"} == set(planner["estimated"])
    assert all(v > 0 for v in planner["measured"].values()) and planner["prompt_tokens"] > 50
    assert flux["measured"]["edit"] > 0 and flux["estimated"]["edit"] > 0 and flux["steps"] == 2
    assert quantized  # the blocks' Linear layers ran in NF4
    assert (tmp_path / "out" / "gpu_check.json").exists()
    assert (tmp_path / "out" / "planner" / "adapter" / "adapter_config.json").exists()
    import reward
    assert reward.paper_rewards.__name__ == "paper_rewards"  # the check's random reward is not left behind


def test_gpu_check_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--tiny"):
        gpu_check.main([])


@pytest.mark.parametrize("heads,size", [(4, 512), (8, 768)])
def test_flux_plan_within_20_percent_of_measured(tmp_path, heads, size):
    """memory.flux_plan against one measured denoising pass of a FluxTransformer2DModel with NF4 blocks, on the CPU,
    at sizes where activations are most of the peak."""
    r = gpu_check.check_flux(tmp_path, False, 1, size=size, text_tokens=64,
                             sizes=dict(num_layers=2, num_single_layers=4, attention_head_dim=64,
                                        num_attention_heads=heads, joint_attention_dim=128, pooled_projection_dim=64,
                                        axes_dims_rope=[16, 24, 24]))
    assert abs(r["measured"]["edit"] / r["estimated"]["edit"] - 1) < 0.2, r
