"""
The GPU check: the gpu24 models' real architectures with random weights (no network, no downloads), run as the
preset runs them, with the measured peak memory printed next to the plan's estimate (memory.py).

    python gpu_check.py                 # a CUDA GPU with >= 40 GB (the bf16 weights are built there first), < 8 min
    python gpu_check.py --part=planner  # only the planner: Qwen2.5-VL-7B, NF4 + LoRA, 2 GRPO steps (train.py)
    python gpu_check.py --part=flux     # only the editor: FLUX.1-Kontext-dev's transformer in NF4, one edit
    python gpu_check.py --tiny          # the same code on tiny configs, on the CPU (tests/test_gpu_check.py)

planner: configs/qwen2.5-vl-7b-instruct.json with random weights, saved once as a bf16 folder (16 GB, in
$GPU_CHECK_DIR or the temporary folder), then `python train.py --preset=gpu24` itself, loading that folder: NF4,
LoRA r=64, B=8 prompts x G=8 samples, 128 new tokens, 448x448 images, gradient checkpointing, 2 GRPO steps, and an
evaluation of 32 prompts before and after them. Random weights write no tags, so the reward is a seeded random
number (every group then has a signal and every step updates), and no completion stops early: the worst case of
the KV cache. The tokenizer is the tiny
byte-level one (vlm.tiny_folder): text prompts are longer than with Qwen's, and the plan is computed for the
prompt length actually seen.
flux: configs/flux.1-kontext-dev-transformer.json, random bf16 weights, every Linear of the blocks in NF4 (the
layers diffusers quantizes), then `steps` denoising passes of one 1024 px Kontext edit: the target latents and
the reference image's latents (2 x 4096 tokens) with 512 T5 tokens, no grad. Only the transformer: the T5 encoder,
CLIP and the VAE run before and after it (see `train.py --preset=gpu24 --dry_run=True`).

Writes gpu_check.json beside the printed table (in --out, default runs/gpu_check).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

GB = 2**30


def planner_folder(root, tiny):
    """A Qwen2.5-VL folder with random weights: the 7B config (or a tiny one) and the tiny tokenizer's ids."""
    import vlm
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    folder = Path(root) / ("planner-tiny" if tiny else "planner-7b-random")
    if (folder / "config.json").exists():
        return folder
    tok_dir = vlm.tiny_folder(Path(root) / "tokenizer", hidden=64, layers=1)  # its tokenizer and image processor
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tiny:
        config = json.loads((tok_dir / "config.json").read_text())
        config["text_config"].update(vocab_size=4096, hidden_size=128, intermediate_size=256)
        config["vision_config"]["out_hidden_size"] = 128
        config["text_config"]["rope_parameters"]["mrope_section"] = [4, 6, 6]
    else:
        config = json.loads((Path(__file__).parent / "configs" / "qwen2.5-vl-7b-instruct.json").read_text())
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [("image_token_id", "<|image_pad|>"), ("video_token_id",
           "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
           ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")]}
    config.update(ids, bos_token_id=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    with torch.device(device):  # random init where it is fast; saved in bf16 like the hub's weights
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig.from_dict(config),
                                                                dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    tok.save_pretrained(folder)
    for f in ("preprocessor_config.json", "chat_template.jinja"):
        if (tok_dir / f).exists():
            (folder / f).write_bytes((tok_dir / f).read_bytes())
    print(f"planner: random weights of {folder.name} built and saved in {time.time() - t:.0f}s")
    return folder


def check_planner(out, tiny):
    """Two GRPO steps of train.py on the gpu24 preset; returns memory.json (measured and planned per phase)."""
    import reward
    import train
    import tempfile
    folder = planner_folder(os.environ.get("GPU_CHECK_DIR") or Path(tempfile.gettempdir()) / "gpu_check", tiny)

    g = torch.Generator().manual_seed(0)

    def random_reward(texts, golds):  # random weights write no tags (and most of their tokens decode to nothing)
        r = torch.rand(len(texts), generator=g)  # a seeded random reward: every group has a signal, every step updates
        return r, {"format": r * 0, "f1": r, "f1_action": r, "f1_subject": r, "f1_goal": r}
    run = Path(out) / "planner"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    args = [f"--planner={folder}", f"--out_dir={run}", "--steps=2", "--sft_steps=0", "--eval_every=2"]
    args += ["--preset=tiny_vl", "--grad_checkpointing=True", "--eval_n=4"] if tiny else \
        ["--preset=gpu24", "--eval_n=32"]
    t, paper = time.time(), reward.paper_rewards
    reward.paper_rewards = random_reward
    try:
        train.main(train.parse_args(args))
    finally:
        reward.paper_rewards = paper
    mem = json.loads((run / "memory.json").read_text())
    mem["seconds"] = round(time.time() - t)
    return mem


def nf4_linears(module, dtype):
    """Replace every nn.Linear of `module` by a bitsandbytes NF4 Linear4bit holding the same weights (quantized on
    the module's device), as diffusers' bitsandbytes backend does for a FLUX transformer's blocks."""
    import bitsandbytes as bnb
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            device = child.weight.device
            setattr(module, name, q.to(device))
            del child
        else:
            nf4_linears(child, dtype)


@torch.no_grad()
def check_flux(out, tiny, steps, size=1024, text_tokens=512, sizes=None):
    """`steps` passes of the FLUX.1-Kontext transformer in NF4 over one Kontext edit; measured vs planned bytes.
    `sizes`: config fields to override (a smaller model of the same class)."""
    import memory
    from diffusers import FluxTransformer2DModel
    config = json.loads((Path(__file__).parent / "configs" / "flux.1-kontext-dev-transformer.json").read_text())
    if tiny:
        config.update(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6])
        size, text_tokens = 128, 16
    config.update(sizes or {})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    import gc
    gc.collect()  # the planner part's model is gone: its memory is not counted here
    if device == "cuda":
        torch.cuda.empty_cache()
    meter = memory.Meter(device)  # made before the weights, so they count (on a GPU, everything allocated does)
    t = time.time()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 12B model in fp32 first would need twice the memory
    with torch.device(device):
        model = FluxTransformer2DModel.from_config(config)
    torch.set_default_dtype(default)
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        nf4_linears(blocks, dtype)
    model.eval()
    print(f"flux: random weights built and quantized in {time.time() - t:.0f}s")
    n = (size // 16) ** 2  # latent tokens of one image: 8x VAE, then 2x2 patches
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 2 * n, config["in_channels"], device=device, dtype=dtype, generator=g)  # target + reference
    ids = torch.zeros(2 * n, 3, device=device)
    ids[n:, 0] = 1  # Kontext marks the reference image's tokens with a first coordinate of 1
    side = torch.arange(size // 16, device=device).float()
    ids[:, 1] = side.repeat_interleave(size // 16).repeat(2)
    ids[:, 2] = side.repeat(size // 16).repeat(2)
    text = torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype, generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype, generator=g)
    t = time.time()
    with meter.phase("edit"):
        for i in range(steps):
            model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.full((1,), 1 - i / steps, device=device, dtype=dtype),
                  img_ids=ids, txt_ids=torch.zeros(text_tokens, 3, device=device),
                  guidance=torch.full((1,), 2.5, device=device, dtype=dtype) if config["guidance_embeds"] else None)
    plan = memory.flux_plan(config, size, text_tokens, 2 if device == "cuda" else 4)
    return {"device": device, "measured": {"edit": meter.peaks["edit"]}, "estimated": {"edit": sum(plan.values())},
            "parts": plan, "steps": steps, "seconds_per_step": round((time.time() - t) / steps, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "planner", "flux"], default="all")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, for the CPU")
    ap.add_argument("--flux_steps", type=int, default=28, help="denoising passes (memory is the same for each)")
    ap.add_argument("--out", default="runs/gpu_check")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: gpu_check.py needs a CUDA GPU (the real 7B and 12B architectures); --tiny runs the same "
                 "code on tiny configs on the CPU")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB")
    t0, results = time.time(), {}
    if args.part in ("all", "planner"):
        results["planner"] = check_planner(args.out, args.tiny)
    if args.part in ("all", "flux"):
        results["flux"] = check_flux(args.out, args.tiny, 2 if args.tiny else args.flux_steps)
    print(f"\n{'part':<10} {'phase':<8} {'measured GB':>12} {'planned GB':>11} {'error':>7}")
    for part, r in results.items():
        for phase, v in r["measured"].items():
            est = r["estimated"].get(phase)
            print(f"{part:<10} {phase:<8} {v / GB:12.3f} {est / GB:11.3f} {(v / est - 1) * 100:+6.1f}%")
    results["seconds"] = round(time.time() - t0)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(f"total {results['seconds']}s; wrote {Path(args.out) / 'gpu_check.json'}")
    return results


if __name__ == "__main__":
    main()
