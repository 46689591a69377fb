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

Two things make the copy fast on a CPU: its decoding attention reads each prompt's keys once per group
(rollout.group_attention), and its Linear layers keep their weights in oneDNN's blocked layout (`Packed`).
"""
import torch

import memory
from planner import dequantized_folder
from rollout import use_group_attention


class Merged:
    """A plain copy of a text planner for sampling, kept in step with the policy's adapter by `sync(policy)`."""

    def __init__(self, folder, dtype, device="cpu"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(dequantized_folder(folder), dtype=torch.float32)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        use_group_attention(self.model)  # decoding reads each prompt's keys once per group, not once per sample
        if torch.device(device).type == "cpu" and packs():
            for name, m in list(model.named_modules()):
                if type(m) is torch.nn.Linear:
                    model.set_submodule(name, Packed(m.weight, m.bias))  # the tied output layer gets its own
        self.modules = dict(model.named_modules())
        self.dtype = dtype

    @torch.no_grad()
    def sync(self, policy):
        """Write the policy's current adapter into the copy: every LoRA layer's merged weight, in the copy's dtype."""
        n = 0
        for name, m in policy.named_modules():
            if not hasattr(m, "lora_A") or "default" not in m.lora_A:
                continue
            target = self.modules[name.removeprefix("base_model.model.")]
            delta = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
            # the base dequantized again each time (milliseconds), not kept: in fp32 it would be 106 MB on the cpu
            # preset, and merging into the bf16 copy's last weights instead would drift
            weight = (base_weight(m.base_layer) + m.scaling["default"] * delta).to(self.dtype)
            target.set(weight) if isinstance(target, Packed) else target.weight.copy_(weight.to(target.weight.device))
            n += 1
        if n == 0:
            raise ValueError("the policy has no LoRA layers to merge into the rollout engine")
        return n


class Packed(torch.nn.Module):
    """A Linear layer for inference on a CPU whose weight is kept in oneDNN's blocked layout (the layout PyTorch's
    compiler prepacks CPU weights into; torch.ops.mkldnn). The same numbers as F.linear, 1.3-1.6x faster for the
    planner's shapes on this machine (a decoded token of 32 sequences: 0.23 -> 0.15 ms for a 576 x 1536 weight;
    the 49k-token output layer 8.9 -> 5.4 ms). No gradients: the copy only samples."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.bias = bias
        self.set(weight)

    def set(self, weight):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # 32: rows of a decoded token

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packs():
    """Whether this torch can keep weights in oneDNN's layout (private operators: a build without them, or a later
    torch that drops them, leaves the copy's Linear layers plain)."""
    try:
        return torch.backends.mkldnn.is_available() and Packed(torch.ones(2, 2))(torch.ones(1, 2)).shape == (1, 2)
    except (AttributeError, RuntimeError):
        return False


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
