"""gpu_check.py's code on tiny configs on the CPU: the same functions the GPU run uses, so the script a lent GPU
runs is known to work before it gets there."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Models and caches in tmp_path: a test builds its own random models and never reads the user's."""
    monkeypatch.setenv("GPU_CHECK_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_dry_lists_every_check_and_loads_nothing(monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("--dry ran a check")
    for f in ("check_train", "check_edit", "run_planner", "run_flux"):
        monkeypatch.setattr(gpu_check, f, never)
    monkeypatch.setattr(gpu_check.memory, "pick_device", never)  # not even a device is chosen
    r = gpu_check.main(["--dry"])
    out = capsys.readouterr().out
    assert r["checks"] == list(gpu_check.CHECKS)
    for name, check in gpu_check.CHECKS.items():
        assert name in out and check.what in out and f"bar: {check.bar}" in out
    assert {"tiny.paper", "tiny.outcome", "tiny_vl.paper", "tiny_vl.outcome", "tiny_vl.judge", "edit.kontext",
            "edit.pix2pix", "edit.inpaint", "page", "planner", "flux", "ranks"} == set(gpu_check.CHECKS)
    assert gpu_check.main(["--dry", "--only=tiny_vl,flux"])["checks"] == \
        ["tiny_vl.paper", "tiny_vl.outcome", "tiny_vl.judge", "flux"]  # a family, then a name
    with pytest.raises(SystemExit, match="no check called 'tiny_vlm'.*the checks: tiny.paper"):
        gpu_check.main(["--dry", "--only=tiny_vlm"])
    # In a fresh process: no model library is even imported, let alone a model built.
    code = ("import sys, gpu_check; gpu_check.main(['--dry']); "
            "assert not {'transformers', 'diffusers', 'peft', 'train', 'edit'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(gpu_check.__file__).parent,
                   capture_output=True, timeout=120)


def test_an_editor_check_alone_uses_the_tiny_pipeline(places):
    """`--only=edit.kontext` in a fresh process, where nothing imported agents.py before the check swapped in the
    tiny pipeline's loader: agents.py's import must not put the real FLUX.1-Kontext loader back."""
    out = places / "out"
    run = subprocess.run([sys.executable, "gpu_check.py", "--tiny", "--only=edit.kontext", f"--out={out}"],
                         cwd=Path(gpu_check.__file__).parent, capture_output=True, text=True, timeout=600)
    checks = json.loads((out / "gpu_check.json").read_text())["checks"]
    assert run.returncode == 0 and checks["edit.kontext"]["result"] == "PASS", run.stdout[-2000:]


def test_gpu_check_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--tiny"):
        gpu_check.main([])


def test_a_failing_check_is_a_fail_row_and_the_others_still_run(places, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("a forced failure")
    monkeypatch.setattr(gpu_check, "check_planner", broken)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--tiny", "--only=planner,flux", f"--out={places / 'out'}"])
    assert e.value.code == 1  # the CLI exits non-zero
    table = capsys.readouterr().out.split("\ncheck ")[-1]
    assert "planner          FAIL" in table and "RuntimeError: a forced failure" in table
    assert "flux             INFO" in table  # ran after the failure; its bar is reported only with --tiny
    r = json.loads((places / "out" / "gpu_check.json").read_text())
    assert r["failed"] == ["planner"] and r["checks"]["flux"]["result"] == "INFO"
    err = r["checks"]["planner"]["error"]
    assert err["type"] == "RuntimeError" and err["message"] == "a forced failure" and "broken" in err["traceback"]
    assert r["checks"]["flux"]["details"]["measured"]["edit"] > 0


def test_tiny_runs_every_check_and_all_pass(places, monkeypatch):
    """Every check of `make gpu-check` on tiny configs on the CPU: about 1.5 minutes on 2 cores."""
    import bitsandbytes as bnb

    import agents
    import registry
    import edit
    import reward
    quantized = []
    real = gpu_check.nf4_linears

    def count(module, dtype):
        real(module, dtype)
        quantized.extend(m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit))
    monkeypatch.setattr(gpu_check, "nf4_linears", count)
    stand_ins = (reward.paper_rewards, edit.load_planner, registry.LOADERS)
    out = places / "out"
    r = gpu_check.main(["--tiny", f"--out={out}"])
    checks = r["checks"]
    assert list(checks) == list(gpu_check.CHECKS) and r["failed"] == []
    assert {n for n, c in checks.items() if c["result"] == "INFO"} == {"planner", "flux"}  # bars reported only
    assert all(c["result"] == "PASS" for n, c in checks.items() if n not in ("planner", "flux")), checks
    for name in ("tiny.paper", "tiny_vl.paper", "tiny_vl.judge"):  # these update at every step
        assert [g["kept_groups"] > 0 for g in checks[name]["details"]["grpo"]] == [True] * 3
    assert (out / "tiny_vl.judge" / "cold_start" / "adapter_config.json").exists()  # the cold start ran
    for e in gpu_check.EDITORS:
        assert (out / f"edit.{e}" / "out.png").exists() and checks[f"edit.{e}"]["details"]["editor"] == "cpu float32"
    assert (out / "page" / "in.png").exists() and "the planner freed before the editor ran: [True, True]" in \
        checks["page"]["measured"]
    planner, flux = checks["planner"]["details"], checks["flux"]["details"]
    assert set(planner["measured"]) == {"vision", "sample", "update", "eval"} == set(planner["estimated"])
    assert all(v > 0 for v in planner["measured"].values()) and planner["prompt_tokens"] > 50
    assert flux["measured"]["edit"] > 0 and flux["estimated"]["edit"] > 0 and flux["steps"] == 2
    assert quantized  # the blocks' Linear layers ran in NF4
    ranks = checks["ranks"]  # torchrun against 1 process: gloo on the CPU; skipped on a machine with one GPU
    assert "2 ranks (gloo, CPU): adapter max |diff|" in ranks["measured"] if r["device"] == "cpu" else \
        ranks["result"] in ("SKIP", "PASS")
    assert json.loads((out / "gpu_check.json").read_text())["failed"] == []
    assert (out / "planner" / "adapter" / "adapter_config.json").exists()
    # the checks' stand-ins are not left behind
    assert (reward.paper_rewards, edit.load_planner, registry.LOADERS) == stand_ins
    assert not agents.loaded() or not set(agents.loaded()) & set(gpu_check.EDITORS)


@pytest.mark.parametrize("heads,size", [(4, 512), (8, 768)])
def test_flux_plan_within_20_percent_of_measured(tmp_path, heads, size):
    """memory.flux_plan against one measured denoising pass of a FluxTransformer2DModel with NF4 blocks, on the CPU,
    at sizes where activations are most of the peak."""
    r = gpu_check.check_flux(tmp_path, False, 1, "cpu", torch.float32, size=size, text_tokens=64,
                             sizes=dict(num_layers=2, num_single_layers=4, attention_head_dim=64,
                                        num_attention_heads=heads, joint_attention_dim=128, pooled_projection_dim=64,
                                        axes_dims_rope=[16, 24, 24]))
    assert abs(r["measured"]["edit"] / r["estimated"]["edit"] - 1) < 0.2, r


def test_ranks_check_is_skipped_with_fewer_than_two_gpus(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the check runs")
    import argparse
    ctx = argparse.Namespace(tiny=False, out=tmp_path, device="cuda" if torch.cuda.is_available() else "cpu")
    row = gpu_check.run_check("ranks", ctx)
    assert row["result"] == "SKIP" and "the check needs 2 or more" in row["measured"] and not row["problems"]
    assert not list(tmp_path.iterdir())  # nothing ran
