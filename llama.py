"""
A Llama forward pass and its chat tokenizer in plain torch, for planning on a CPU in edit.py.

On a 2-core machine, importing transformers' model classes takes about 4 s (transformers 5 imports
torch.distributed, torch._dynamo and scipy along the way), half of what one `python edit.py` may take. The cpu and
tiny planners are Llamas, so edit.py runs them with the ~60 lines below instead: the same saved folder (the
dequantized NF4 weights with the LoRA adapter merged in), the same numbers as transformers' LlamaForCausalLM
(tests/test_llama.py compares the logits), greedy decoding of one request with a KV cache.
Training, the sequencing model and the gpu24 VLM use transformers.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from planner import merge_lora


class Llama:
    """Inference only, one sequence. `weights`: the state dict of a LlamaForCausalLM (names as saved)."""

    def __init__(self, config, weights):
        c = config
        if c.get("model_type") != "llama" or c.get("attention_bias") or c.get("mlp_bias") \
                or c.get("hidden_act") != "silu" or (c.get("rope_parameters") or {}).get("rope_type") != "default":
            raise ValueError("llama.py runs plain Llama checkpoints only (silu, no biases, default rope); "
                             f"got {c.get('model_type')!r}; load this one with transformers")
        self.w, self.layers, self.eps = weights, c["num_hidden_layers"], c["rms_norm_eps"]
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        theta = c["rope_parameters"]["rope_theta"]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])

    def norm(self, x, name):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.w[name]

    def rope(self, x, pos):  # x (heads, T, head_dim); the halves-rotation transformers' Llama uses
        freqs = pos[:, None].float() * self.inv_freq[None]
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    @torch.no_grad()
    def forward(self, ids, cache):
        """Logits (V,) after `ids` (list of T ints) given `cache` (a list, filled with each layer's keys and values
        on the first call and extended after)."""
        past = cache[0][0].shape[1] if cache else 0
        pos = torch.arange(past, past + len(ids))
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self.norm(x, p + "input_layernorm.weight")
            q, k, v = (F.linear(h, self.w[f"{p}self_attn.{n}_proj.weight"]).view(len(ids), -1, self.head_dim)
                       .transpose(0, 1) for n in "qkv")
            q, k = self.rope(q, pos), self.rope(k, pos)
            if len(cache) > i:
                k, v = torch.cat([cache[i][0], k], 1), torch.cat([cache[i][1], v], 1)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, 0) for t in (k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and len(ids) > 1)
            x = x + F.linear(a.transpose(0, 1).reshape(len(ids), -1), self.w[p + "self_attn.o_proj.weight"])
            h = self.norm(x, p + "post_attention_layernorm.weight")
            gate, up = (F.linear(h, self.w[f"{p}mlp.{n}_proj.weight"]) for n in ("gate", "up"))
            x = x + F.linear(F.silu(gate) * up, self.w[p + "mlp.down_proj.weight"])
        return F.linear(self.norm(x[-1], "model.norm.weight"), self.lm_head)

    def greedy(self, ids, max_new_tokens, stop, grammar=None):
        """The greedy continuation of `ids` (token ids), up to and without the first token in `stop`; `grammar`
        (rollout.PlanGrammar) keeps it to runnable plans."""
        cache, out, text = [], [], ""
        logits = self.forward(ids, cache)
        for _ in range(max_new_tokens):
            if grammar is not None:
                logits = logits.masked_fill(~grammar.mask([text], logits[None])[0], float("-inf"))
            tok = int(logits.argmax())
            if tok in stop:
                break
            out.append(tok)
            text += grammar.strings[tok] if grammar is not None else ""
            logits = self.forward([tok], cache)
        return out


class ChatTokenizer:
    """The parts of a transformers tokenizer that rollout.build_prompt, stop_ids and decoding use, from a saved
    folder's tokenizer.json, tokenizer_config.json and chat template (rendered with jinja2 as transformers does)."""

    def __init__(self, folder):
        import jinja2.sandbox
        from tokenizers import Tokenizer
        folder = Path(folder)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template") or (folder / "chat_template.jinja").read_text()
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)
        self.bpe = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.eos_token_id, self.pad_token_id, self.unk_token_id = (
            self.bpe.token_to_id(cfg[k]) if cfg.get(k) else None for k in ("eos_token", "pad_token", "unk_token"))

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        assert not tokenize, "render the text, then call the tokenizer on it"
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.bpe.encode(text, add_special_tokens=add_special_tokens).ids}

    def convert_tokens_to_ids(self, token):
        return self.bpe.token_to_id(token)

    def __len__(self):
        return self.bpe.get_vocab_size()

    def decode(self, ids, skip_special_tokens=False):
        return self.bpe.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load(folder, adapter=None):
    """(Llama, ChatTokenizer) from a saved LlamaForCausalLM folder, with a LoRA adapter merged in if given."""
    from safetensors.torch import load_file
    folder = Path(folder)
    weights = load_file(folder / "model.safetensors")
    if adapter:
        merge_lora(weights, adapter)
    return Llama(json.loads((folder / "config.json").read_text()), weights), ChatTokenizer(folder)
