"""
Rollouts: prompts for the planner, KV-cached group sampling, and log-probs of completions.

GRPO samples G completions of every prompt. `sample_group` prefills each prompt once, repeats its KV cache G times
(the prompt is the same for the whole group, so its keys and values are too) and then decodes all B*G sequences
together, one token per forward pass. `generate(num_return_sequences=G)` instead copies the prompt G times before
the prefill and so computes the same keys and values G times.

The log-probs returned are those of the distribution the tokens are drawn from, logits / temperature (greedy
decoding, temperature 0, reports temperature 1's), and `completion_logp` takes the same temperature: the GRPO loss's
`old_logp`, `logp` and `ref_logp` are then log-probs of one distribution, as in common GRPO implementations.
Simplified: the top-p cut and the masks of constrained decoding (`allowed`, PlanGrammar) shape which token is
drawn but are left out of the log-probs, which stay those of the full tempered distribution.
"""
import contextlib
import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import editor
from plan import ACTIONS, FIELDS

SYSTEM = ("You split an image edit request into single edits. Answer only in this form, items separated by ';' "
          "and aligned by position: <action>a1; a2</action><subject>s1; s2</subject><goal>g1; g2</goal>. "
          f"Actions: {', '.join(ACTIONS)}.")


def build_prompt(tok, instruction, description=None, system=SYSTEM):
    """Token ids (list[int]) of the chat prompt for one request. `description` is the text the CPU perception
    agents write about the image, for a planner that cannot see it."""
    user = f"Image: {description}\nRequest: {instruction}" if description else f"Request: {instruction}"
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def stop_ids(tok, model=None):
    """Token ids that end a completion: the chat end-of-turn marker, the tokenizer's end-of-sequence and those of
    the model's generation config (Qwen2.5-VL stops on both <|im_end|> and <|endoftext|>)."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = {tok.eos_token_id, end if end != tok.unk_token_id else None}  # unk: the tokenizer has no such token
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def left_pad(prompts, pad_id, device):
    """Left-pad a list of id lists. Returns ids (B, L), attention mask (B, L) and position ids (B, L) that count
    from 0 at each prompt's first real token, as `generate` does."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def top_p_filter(probs, top_p):
    """Zero the tail of each row outside the smallest set of tokens whose mass reaches top_p. probs: (N, V)."""
    if top_p >= 1.0:
        return probs
    p, idx = probs.sort(-1, descending=True)
    drop = (p.cumsum(-1) - p) > top_p  # mass before a token already reached top_p; the top token always stays
    return torch.zeros_like(probs).scatter(-1, idx, p.masked_fill(drop, 0.0))


def draw(probs, generator=None, block=256):
    """One token per row of probs (N, V), by inverting the cumulative distribution at a uniform draw: the same
    distribution as torch.multinomial, which on a CPU costs 30x more. In two levels: the cumulative mass of blocks of
    `block` tokens picks a block, then that block's own picks the token (a cumulative sum over all 49k tokens of
    SmolLM2 costs 6x more, and rounds more). `generator`: one, or a list of them that split the rows in equal
    consecutive shares (one per prompt's group: see sample_group)."""
    N, V = probs.shape
    p = F.pad(probs, (0, -V % block)).view(N, -1, block)                          # (N, blocks, block)
    cum = p.sum(-1).cumsum(-1)                                                    # (N, blocks)
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(N // len(generator), 1, generator=g, device=probs.device) for g in generator])
    else:
        u = torch.rand(N, 1, generator=generator, device=probs.device)
    u = u * cum[:, -1:]
    b = torch.searchsorted(cum, u, right=True).clamp(max=cum.shape[1] - 1)        # right: no zero-mass block
    u = u - torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)          # the mass left inside block b
    inner = p.gather(1, b[..., None].expand(N, 1, block)).squeeze(1).cumsum(-1)   # (N, block)
    i = torch.searchsorted(inner, u, right=True).clamp(max=block - 1)
    return (b * block + i).clamp(max=V - 1).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Constrained decoding: the CPU editor has a closed vocabulary, so a plan with any other action or goal fails at
# run time (the untrained 135M planner writes 'sepia filter', 'reframe', 'moderately' as actions). PlanGrammar
# masks, at each decoding step, the tokens after which the text can no longer become a runnable plan:
#   <action>A; A</action><subject>S; S</subject><goal>G; G</goal>   then a stop token, and nothing else
# with A one of the editor's actions, G one of editor.goal_choices(A) for the action at the same position (or, for
# a colour, any lower-case '#rrggbb': HEX), S free printable text (no ';', '<', '>', at most SUBJECT_CHARS), as many
# subjects and goals as actions, MAX_ITEMS at most. Only the `top_k` likeliest tokens are tried (if none fits: the
# tokens of the choices, hex digits and tags; then any).
HEX = re.compile(r"#[0-9a-f]{0,6}")  # a '#rrggbb' colour being written; a whole one has its 6 digits


def plan_grammar(tok):
    """The PlanGrammar of a tokenizer, built once: about 0.25 s for SmolLM2's, half of it decoding its 49k tokens,
    most of the rest tokenizing its 1.8k goals twice (a thousand angles, 442 ratios, the colours)."""
    if getattr(tok, "_plan_grammar", None) is None:
        tok._plan_grammar = PlanGrammar(tok, stop_ids(tok))
    return tok._plan_grammar


class PlanGrammar:
    MAX_ITEMS, SUBJECT_CHARS = 4, 32

    def __init__(self, tok, stop, top_k=32):
        a, s, g = FIELDS  # the tags of plan.format_plan: '<action>', '</action><subject>', ...
        self.heads = (f"<{a}>", f"</{a}><{s}>", f"</{s}><{g}>", f"</{g}>")
        self.tok, self.strings = tok, [tok.decode([i]) for i in range(len(tok))]  # the text each token adds
        self.stop, self.top_k = set(stop), top_k
        # sets: a whole goal is looked up at every step, and rotate has a thousand of them
        self.choices = {"action": set(editor.ACTIONS), **{a: set(editor.goal_choices(a)) for a in editor.ACTIONS}}
        # An action or goal is written in its own tokens only: 'sepia' may not start as 's' + 'epi', which the
        # model never saw and after which it has no good next token. pieces[key, lead]: the texts at the token
        # boundaries of each choice, written after a tag (lead "") or after '; ' (lead " ", which its first token
        # carries).
        self.pieces, self.common = {}, set()
        for key, words in self.choices.items():
            for lead in ("", " "):
                self.pieces[key, lead] = {""}
                for c in words:
                    ids, done = tok(lead + c, add_special_tokens=False)["input_ids"], ""
                    for i in ids:
                        done += self.strings[i]
                        self.pieces[key, lead].add(done)
                    self.common.update(ids)
        for text in (*self.heads, ";", "; ", "<", "</"):
            self.common.update(tok(text, add_special_tokens=False)["input_ids"])
        # '#rrggbb' is checked by pattern, in any tokens (there is no list to take its own tokens from): every token
        # that can write part of one is common, so a colour begun is always finished
        self.common.update(i for i, s in enumerate(self.strings) if re.fullmatch(r" ?#[0-9a-f]{0,6}|[0-9a-f]{1,6}", s))

    def state(self, text):
        """'done' (a whole plan), 'open' (the start of one) or None (no runnable plan starts like this)."""
        pos, actions = 0, []
        for f, head in enumerate(self.heads):
            rest = text[pos:]
            if not rest.startswith(head):
                return "open" if len(rest) < len(head) and head.startswith(rest) else None
            pos += len(head)
            if f == 3:
                return "done" if pos == len(text) else None
            end = text.find("<", pos)
            items = self._items(f, text[pos:] if end < 0 else text[pos:end], actions, closed=end >= 0)
            if items is None:
                return None
            if f == 0:
                actions = items
            if end < 0:
                return "open"
            pos = end

    def _items(self, f, body, actions, closed):
        """The complete items of one field's text, or None if it breaks the grammar."""
        parts = body.split(";")
        if any(p and not p.startswith(" ") for p in parts[1:]):
            return None
        items = [parts[0]] + [p[1:] for p in parts[1:]]
        limit = self.MAX_ITEMS if f == 0 else len(actions)
        if len(items) > limit or (closed and f and len(items) != limit):
            return None
        for i, (item, raw) in enumerate(zip(items, parts)):
            last = i == len(items) - 1 and not closed  # still being written
            if f == 1:
                ok = (len(item) <= self.SUBJECT_CHARS and item.isprintable() and not set(item) & set("<>;\ufffd")
                      and not item.startswith(" ") and (last or item.strip()))
            else:
                key = "action" if f == 0 else actions[i]
                hex_ok = key in editor.COLOR_ACTIONS and HEX.fullmatch(item)
                if last:
                    ok = raw in self.pieces[key, " " if i else ""] or hex_ok
                else:
                    ok = item in self.choices[key] or hex_ok and len(item) == 7
            if not ok:
                return None
        return items if closed else items[:-1]

    def fits(self, text, token):
        if token in self.stop:
            return self.state(text) == "done"
        s = self.strings[token] if token < len(self.strings) else ""
        return bool(s) and self.state(text + s) is not None

    def mask(self, texts, logits, skip=None):
        """(N, V) bool: the tokens row i may take after texts[i]; rows in `skip` (finished) are left free."""
        keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        top = logits.topk(min(self.top_k, logits.shape[-1]), -1).indices.tolist()
        for i, text in enumerate(texts):
            if skip is not None and skip[i]:
                keep[i] = True
                continue
            if self.state(text) == "done":
                keep[i, sorted(self.stop)] = True
                continue
            ok = [t for t in top[i] if self.fits(text, t)] or [t for t in self.common if self.fits(text, t)]
            if not ok:  # rare (a subject's odd next character): the first few that fit, likeliest first
                fit = (t for t in logits[i].argsort(descending=True).tolist() if self.fits(text, t))
                ok = [t for _, t in zip(range(4), fit)] or sorted(self.stop)  # no token fits at all: stop
            keep[i, ok] = True
        return keep


@dataclass
class Rollout:
    ids: torch.Tensor   # (B*G, T) completion tokens, pad after a sequence stopped; rows ordered prompt-major
    mask: torch.Tensor  # (B*G, T) 1 for real completion tokens (the stop token included), 0 for padding
    logp: torch.Tensor  # (B*G, T) log-prob of each token under the model, 0 at padding


def prompt_inputs(model, prompts, pad_id, vision=None):
    """The model inputs of left-padded prompts: (inputs dict, attention mask (B, L), positions (B, L), or (3, B, L)
    for a VLM). `vision` (a vlm.Vision): the prompts' images, written into the token embeddings."""
    ids, attn, pos = left_pad(prompts, pad_id, next(model.parameters()).device)
    if vision is None:
        return {"input_ids": ids}, attn, pos
    embeds, pos = vision.inputs(model.get_input_embeddings(), ids, attn)
    return {"inputs_embeds": embeds}, attn, pos


def prefill(model, prompts, pad_id, vision=None, min_shared=16):
    """The prompts through the model, keeping the KV cache and the last position's logits. Text prompts that begin
    alike (the system prompt: every prompt of a GRPO step, of an evaluation batch) share that beginning: it runs
    once, for one row, its cache is repeated, and each prompt's rest runs on top, left-padded after the shared part.
    Returns (output, attention mask, positions)."""
    n = shared_prefix(prompts) if vision is None and len(prompts) > 1 else 0
    if n < min_shared:
        inputs, attn, pos = prompt_inputs(model, prompts, pad_id, vision)
        return model(**inputs, attention_mask=attn, position_ids=pos, use_cache=True,
                     logits_to_keep=last(1, attn.shape[1], attn.device)), attn, pos
    device = next(model.parameters()).device
    cache = model(input_ids=torch.tensor([prompts[0][:n]], device=device), use_cache=True,
                  logits_to_keep=last(1, n, device)).past_key_values  # only its cache is wanted
    cache.batch_repeat_interleave(len(prompts))
    ids, rest, _ = left_pad([p[n:] for p in prompts], pad_id, device)
    attn = torch.cat([torch.ones(len(prompts), n, dtype=rest.dtype, device=device), rest], 1)  # (B, n + S)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # each prompt's tokens count on from the shared part, pads masked
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos[:, n:], past_key_values=cache, use_cache=True,
                logits_to_keep=last(1, ids.shape[1], device))
    return out, attn, pos


def last(k, length, device):
    """logits_to_keep for the last k of `length` positions, as indices: with the int k, transformers slices the
    hidden states to a view that is not contiguous, and torch then multiplies it by the output layer through a batched
    matmul that first copies the whole output matrix once per row (without gradients: 4 x 57 MB for SmolLM2's prefill
    of 4 prompts; a no-grad pass of gpu24's checkpointed update would copy its 1 GB matrix once per completion).
    Indices gather a contiguous copy."""
    return torch.arange(length - k, length, device=device)


def shared_prefix(prompts):
    """How many first tokens all prompts share, leaving each at least one of its own."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


@functools.cache
def cache_layers():
    """(DynamicLayer, ReservedLayer, GroupLayer): layers of transformers' DynamicCache for decoding. Made on first use:
    edit.py's cpu path runs without transformers.
    ReservedLayer has room reserved for `room` more tokens, where each decoded token's keys and values are written
    in place (DynamicLayer concatenates, copying the whole cache at every token: 14% of a rollout on the merged
    engine).
    GroupLayer keeps a group's shared prompt once: the prompts' keys and values (B rows) and, in reserved room, each
    sample's own (B*G rows). Its keys carry the prompt's as `.prompt`, which `group_attention` reads; what other
    code sees of the layer is the samples' part, its length counts both."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, layer, room):
            super().__init__()
            self.is_initialized, self.dtype, self.device = True, layer.keys.dtype, layer.keys.device
            B, H, n, D = layer.keys.shape
            self.k, self.v = layer.keys.new_empty(B, H, n + room, D), layer.values.new_empty(B, H, n + room, D)
            self.k[:, :, :n], self.v[:, :, :n] = layer.keys, layer.values
            self.n, self.keys, self.values = n, self.k[:, :, :n], self.v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            t = key_states.shape[-2]
            if self.n + t > self.k.shape[2]:
                raise RuntimeError(f"KV cache reserved for {self.k.shape[2]} tokens, asked for {self.n + t}")
            self.k[:, :, self.n:self.n + t], self.v[:, :, self.n:self.n + t] = key_states, value_states
            self.n += t
            self.keys, self.values = self.k[:, :, :self.n], self.v[:, :, :self.n]
            return self.keys, self.values

    class GroupLayer(ReservedLayer):
        def __init__(self, layer, group_size, room):
            DynamicLayer.__init__(self)
            self.is_initialized, self.dtype, self.device = True, torch.float32, layer.keys.device  # fp32: see
            self.prompt = (layer.keys.float(), layer.values.float(), group_size)                  # group_attention
            B, H, _, D = layer.keys.shape
            self.k, self.v = (layer.keys.new_empty(B * group_size, H, room, D, dtype=self.dtype) for _ in "kv")
            self.n, self.keys, self.values = 0, self.k[:, :, :0], self.v[:, :, :0]  # the prompt is not copied in

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states)
            keys.prompt = self.prompt
            return keys, values

        def get_seq_length(self):
            return self.prompt[0].shape[-2] + self.n
    return DynamicLayer, ReservedLayer, GroupLayer


def reserve(cache, room, group_size=1, grouped=False):
    """Make room in every layer of a DynamicCache of B prompts for `room` more tokens of `group_size` samples each,
    in place: GroupLayers when `grouped` (the model's attention is `group_attention`), else the prompts' cache
    repeated G times into ReservedLayers."""
    dynamic, reserved, group_layer = cache_layers()
    if grouped and group_size > 1:  # one sample a prompt (greedy plans): nothing to share
        for i, layer in enumerate(cache.layers):
            cache.layers[i] = group_layer(layer, group_size, room)
        return
    cache.batch_repeat_interleave(group_size)
    for i, layer in enumerate(cache.layers):
        if type(layer) is dynamic and layer.is_initialized:
            cache.layers[i] = reserved(layer, room)


def group_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention that reads a group's shared prompt once per prompt, not once per sample: with G samples of each
    prompt, the decoded token of all G (and the heads sharing a key head) meets the prompt's keys in one matmul;
    each sample's own keys (the tokens it decoded) are attended to apart, and one softmax runs over both. The same
    numbers as SDPA over the repeated cache, in fp32 (on this CPU SDPA in bf16 spends 0.9 ms a layer of a decoded
    token at G=8, this 0.2 ms). Anything else goes to SDPA; prompts and the update's forward pass with a padding mask
    in its grouped-query form (transformers repeats the key heads there: on the cpu preset's update twice the bytes
    kept for the backward, and slower)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    prompt = getattr(key, "prompt", None)
    if prompt is None or query.shape[2] != 1:
        if query.shape[2] == 1 or attention_mask is None or attention_mask.dtype != torch.bool or \
                dropout and module.training:  # (decoding one token without a group: transformers' way is faster)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    kp, vp, G = prompt
    N, H, _, D = query.shape
    B, Hk, L, _ = kp.shape
    r = H // Hk  # query heads per key head
    q = query.float().view(B, G, Hk, r, D) * (scaling or D ** -0.5)
    qp = q.transpose(1, 2).reshape(B, Hk, G * r, D)                       # a prompt's queries, all samples
    sp = (qp @ kp.transpose(-1, -2)).view(B, Hk, G, r, L).transpose(1, 2).reshape(N, Hk, r, L)
    ss = q.view(N, Hk, r, D) @ key.transpose(-1, -2)               # (N, Hk, r, T): the samples' own
    s = torch.cat([sp, ss], -1)
    if attention_mask is not None:  # (N, 1, 1, L + T), bool or additive
        s = s.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else s + attention_mask
    p = s.softmax(-1)
    pp = p[..., :L].reshape(B, G, Hk, r, L).transpose(1, 2).reshape(B, Hk, G * r, L)
    out = (pp @ vp).view(B, Hk, G, r, D).transpose(1, 2).reshape(N, Hk, r, D) + p[..., L:] @ value
    return out.to(query.dtype).reshape(N, 1, H, D), None


def use_group_attention(model):
    """Let `model` (a transformers causal LM) decode groups with `group_attention` (the rollout engine's copy)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("grouped", group_attention)
    AttentionMaskInterface.register("grouped", sdpa_mask)
    model.set_attn_implementation("grouped")


@torch.no_grad()
def sample_group(model, prompts, group_size, max_new_tokens, stop, pad_id, temperature=1.0, top_p=1.0,
                 generator=None, allowed=None, grammar=None, vision=None):
    """Sample `group_size` completions for each prompt (a list of B token-id lists) with a shared KV cache.
    temperature 0 is greedy. Pass a torch.Generator (on the model's device) so a seed replays a rollout, or a list
    of B of them, one per prompt: then a group's completions do not depend on which prompts share its batch (the
    ranks of a distributed run each sample a share of a step's prompts).
    `allowed` (token ids) restricts which tokens may be drawn (the sequencer's constrained answer); the log-probs
    stay those of the full distribution at this temperature (see the module's docstring). `grammar` (a
    PlanGrammar) does the same for runnable plans.
    `vision` (a vlm.Vision): the prompts' images, for a VLM planner."""
    device = next(model.parameters()).device
    out, attn, pos = prefill(model, prompts, pad_id, vision)
    cache = out.past_key_values
    reserve(cache, max_new_tokens, group_size,  # prompt i's cache for its G samples
            grouped=getattr(model.config, "_attn_implementation", None) == "grouped")
    logits = out.logits[:, -1].repeat_interleave(group_size, 0)  # (B*G, V)
    attn = attn.repeat_interleave(group_size, 0)
    pos = pos[..., -1:].repeat_interleave(group_size, -2)  # (N, 1) or (3, N, 1): after the image, all text
    stop = torch.tensor(stop, device=device, dtype=torch.long)
    N = logits.shape[0]
    done = torch.zeros(N, dtype=torch.bool, device=device)
    toks, lps, masks, texts = [], [], [], [""] * N
    if allowed is not None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
        keep[torch.tensor(sorted(set(allowed) | set(stop.tolist())), device=device)] = True
    for _ in range(max_new_tokens):
        full = logits.float()  # the distribution the log-probs report: logits / temperature (1 for greedy)
        if temperature and temperature != 1.0:
            full = full / temperature
        logits = full
        if allowed is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        if grammar is not None:
            logits = logits.masked_fill(~grammar.mask(texts, logits, done.tolist()), float("-inf"))
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = top_p_filter(F.softmax(logits, -1), top_p)  # masked entries stay 0
            tok = draw(probs, generator)
        tok = tok.masked_fill(done, pad_id)
        toks.append(tok)
        lps.append(token_logp(full, tok).masked_fill(done, 0.0))
        masks.append(~done)
        done = done | torch.isin(tok, stop)
        if grammar is not None:
            texts = [t + grammar.strings[i] for t, i in zip(texts, tok.tolist())]  # the mask keeps ids in range
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        pos = pos + 1
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
    return Rollout(ids=torch.stack(toks, 1), mask=torch.stack(masks, 1).long(), logp=torch.stack(lps, 1))


def completion_logp(model, prompts, ids, mask, pad_id, group_size=1, vision=None, temperature=1.0, min_shared=16):
    """Per-token log-probs (N, T) of completions `ids` (N, T) given their prompts (B lists; N = B * group_size,
    rows prompt-major as `sample_group` returns them), with gradients; padding positions get 0. `temperature`:
    that of the sampler, whose log-probs these then equal (0 counts as 1, as in `sample_group`).
    Like the sampler, the prompts' common beginning (the system prompt, ~165 of ~185 tokens on the cpu preset) goes
    through the model once, each prompt's rest once, and that KV cache is repeated for the group; then all
    completions run on top of it: the same numbers as a forward pass over each full sequence, with the prompt part
    (the longer one here) computed about once instead of N times. Gradients flow through the shared cache into the
    prompts' keys and values, so nothing is approximated. `min_shared`: see `prefill`.
    On a bf16 planner the LoRA adapters compute in bf16 too (autocast): peft keeps them in fp32 and would otherwise
    cast, and keep for the backward, an fp32 copy of every adapted layer's input (0.23 GB of a cpu preset update's
    peak); their weights and gradients stay fp32."""
    dtype = model.get_input_embeddings().weight.dtype  # the compute dtype the planner was loaded in
    with torch.autocast(ids.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
        logits = completion_logits(model, prompts, ids, mask, pad_id, group_size, vision, min_shared)
    return token_logp(logits, ids, temperature) * mask


def completion_logits(model, prompts, ids, mask, pad_id, G, vision, min_shared):
    """The logits (N, T, V) that predict each completion token (see completion_logp)."""
    T = ids.shape[1]
    ids_in = ids.masked_fill(mask == 0, pad_id)
    checkpointed = model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointed:  # a checkpointed layer keeps no KV cache: the prompts as they are, each full sequence run
        p_in, p_attn, p_pos = prompt_inputs(model, prompts, pad_id, vision)
    else:
        out, p_attn, p_pos = prefill(model, prompts, pad_id, vision, min_shared)
    attn = torch.cat([p_attn.repeat_interleave(G, 0), mask], 1)                  # (N, L + T)
    pos = p_pos[..., -1:].repeat_interleave(G, -2) + 1 + torch.arange(T, device=ids.device)  # (N, T) or (3, N, T)
    if checkpointed:  # same numbers, more compute
        if vision is None:
            inputs = {"input_ids": torch.cat([p_in["input_ids"].repeat_interleave(G, 0), ids_in], 1)}
        else:
            rest = model.get_input_embeddings()(ids_in)
            inputs = {"inputs_embeds": torch.cat([p_in["inputs_embeds"].repeat_interleave(G, 0), rest], 1)}
        return model(**inputs, attention_mask=attn, position_ids=torch.cat([p_pos.repeat_interleave(G, -2), pos], -1),
                     logits_to_keep=last(T + 1, attn.shape[1], attn.device)).logits[:, :-1]
    else:
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)
        rest = model(input_ids=ids_in, attention_mask=attn, position_ids=pos, past_key_values=cache,
                     use_cache=True, logits_to_keep=T).logits[:, :-1]             # predicts tokens 1..T-1
        return torch.cat([out.logits[:, -1:].repeat_interleave(G, 0), rest], 1)  # (N, T, V)


def token_logp(logits, ids, temperature=1.0):
    """log softmax(logits / temperature) at `ids`, as the logit taken minus the log-sum-exp over the vocabulary: no
    (.., V) tensor of log-probs is made (on gpu24's update, 16 x 129 x 152k of them in fp32 would be 1.3 GB)."""
    x = logits.float()
    if temperature and temperature != 1.0:
        x = x / temperature
    return x.gather(-1, ids[..., None]).squeeze(-1) - x.logsumexp(-1)


def decode(tok, rollout):
    """The completions as text, without stop and pad tokens."""
    return [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(rollout.ids, rollout.mask)]
