"""
The rollout engine: where GRPO samples its completions from.

The policy is the planner in NF4 with a LoRA adapter (planner.py). Sampling from it dequantizes every 4-bit weight
at every decoded token, and on a CPU that dequantization is the largest cost of a rollout. `Merged` keeps a plain
copy of the planner instead (the same NF4 numbers, dequantized once: planner.dequantized_folder), in bf16 where the
device multiplies bf16 natively and fp32 elsewhere, and writes the adapter into it after every optimizer step:

    W = dequantized base + lora_alpha / r * B @ A        for every layer with an adapter

Rollouts are sampled from the copy with the same KV-cached sampler, grammar and generator; the loss still takes its
log-probs from the NF4 + LoRA policy, so the copy only decides which completions are drawn. The two differ by the
rounding of the copy's dtype: train.py logs the mean absolute difference of their per-token log-probs
(`engine_gap`). Text planners only (cpu, tiny): a VLM planner samples from the policy.
"""
import torch

import memory
from planner import dequantized_folder


class Merged:
    """A plain copy of a text planner for sampling, kept in step with the policy's adapter by `sync(policy)`."""

    def __init__(self, folder, dtype, device="cpu"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(dequantized_folder(folder), dtype=torch.float32)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.modules = dict(model.named_modules())
        self.base = {}  # name -> the fp32 weight of a layer the adapter changes, filled at the first sync
        self.dtype = dtype

    @torch.no_grad()
    def sync(self, policy):
        """Write the policy's current adapter into the copy: every LoRA layer's merged weight, in the copy's dtype."""
        n = 0
        for name, m in policy.named_modules():
            if not hasattr(m, "lora_A") or "default" not in m.lora_A:
                continue
            target = self.modules[name.removeprefix("base_model.model.")]
            if name not in self.base:  # the dequantized base, kept in fp32: merging into bf16 would drift
                self.base[name] = base_weight(m.base_layer).to(target.weight.device)
            delta = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
            target.weight.copy_((self.base[name] + m.scaling["default"] * delta.to(target.weight.device))
                                .to(self.dtype))
            n += 1
        if n == 0:
            raise ValueError("the policy has no LoRA layers to merge into the rollout engine")
        return n


def base_weight(layer):
    """The weight a (possibly 4-bit) Linear computes with, in fp32."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach().float().clone()


def choose_engine(cfg, planner, device):
    """(Merged or None, why) for cfg.engine: "policy" samples from the policy itself; "merged" from a Merged copy;
    "auto" picks merged for a text planner when the copy takes at most a quarter of the memory free on the device
    (on the cpu preset it does; gpu24's 7B planner in bf16 would be 15 GB next to a 24 GB GPU's training)."""
    if cfg.engine == "policy":
        return None, "asked for"
    if planner.processor is not None:  # config.validate refuses engine=merged for a VLM preset
        return None, "a VLM planner samples from the policy"
    dtype = memory.compute_dtype(device, cfg.dtype)  # the run's: bf16 where the device has it natively
    folder = dequantized_folder(planner.model.config.name_or_path)
    need = (folder / "model.safetensors").stat().st_size * dtype.itemsize // 4  # stored in fp32
    free = memory.free_bytes(device)
    if cfg.engine == "auto" and need > free / 4:
        return None, f"a {need / 2**30:.1f} GB copy does not fit next to training ({free / 2**30:.1f} GB free)"
    why = f"{need / 2**20:.0f} MB copy in {str(dtype).removeprefix('torch.')}"
    return Merged(planner.model.config.name_or_path, dtype, device), why
