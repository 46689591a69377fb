"""
The gpu24 planner: Qwen2.5-VL, the paper's decomposition agent, which sees the image; and the local judge.

    planner = vlm.load("Qwen/Qwen2.5-VL-7B-Instruct", device="cuda")   # or "...-3B-Instruct", or a folder
    prompts, vision = vlm.prompts(planner, ["blur the background"], [pil_image])
    roll = rollout.sample_group(planner.policy, prompts, 8, 128, stop, pad, vision=vision)   # the same sampler
    scores = vlm.judge(planner, requests, befores, afters)     # (N, 3): completion, quality, preservation, 0-10
    vlm.tiny_folder("/tmp/tiny-vl")                             # a random tiny Qwen2.5-VL, built offline (tests)

Loading: the language model's layers in NF4 (bitsandbytes); the vision tower (0.68B parameters of the 7B's 8.3B,
where 4-bit hurts most) and lm_head (the output layer, usually left out of 4-bit) in `dtype`; LoRA on the
language model's attention projections only; the vision tower is frozen. The processor caps each image at
`max_pixels` (448x448 by default: 256 image tokens after the 2x2 merge), which bounds the prompt and so the KV
cache of a group.

How the image reaches the shared sampler (`rollout.sample_group`, `completion_logp`): the vision tower runs once per
image, under no_grad (it is frozen), and `Vision` keeps its features. A forward pass then gets `inputs_embeds`
(the token embeddings with the image features written over the image-pad tokens) and 3-D multimodal rope positions
(time, height, width) from the model's own `get_rope_index`. Every token after the image is text, whose three
position rows are equal, so decoding goes on from the last prompt position + 1 exactly as for a text model: the
KV cache, its repetition across the group and the completion log-probs are the same code.

The judge is the planner's base model with the adapter switched off: for each (request, before, after) it is asked
three questions (was the request done, is the result of good quality, is the rest of the image preserved) and
answers a score from 0 to 10; the score is the expectation under the model's next-token distribution over the
score tokens (one extra step reads P("10") = P("1") P("0" | "1")), so it is smooth and needs no sampling.

Simplified: one image per prompt; the judge is a 7B open model, not the paper's GPT-4o / Gemini judges, so its
numbers are not comparable with the paper's.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

import rollout
from planner import Planner, atomic_folder, no_avx512_repack

MODELS = {"7b": "Qwen/Qwen2.5-VL-7B-Instruct", "3b": "Qwen/Qwen2.5-VL-3B-Instruct"}
MAX_PIXELS = 448 * 448
SKIP_4BIT = ["model.visual", "lm_head"]   # kept in dtype: the vision tower and the output layer
LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")  # the language model's attention only, by default


def lora_regex(names=LORA_NAMES):
    """peft's target_modules for Linear layers called `names` in the language model only (the vision tower has
    its own q/k/v-like layers, frozen)."""
    return rf".*language_model.*\.({'|'.join(names)})"


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen2.5-VL's chat format for one image and text, for the tiny model (the real tokenizer ships its own template).
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
            "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hub_error(name, err):
    """The error for a model that is neither a local folder nor in the Hugging Face cache (the hub is offline)."""
    return RuntimeError(
        f"cannot load {name}: it is not a local folder and not in the Hugging Face cache ({type(err).__name__}). "
        f"On a machine with network run `huggingface-cli download {name}` (or unset HF_HUB_OFFLINE), "
        f"or pass a local folder that holds it")


def available(name):
    """(True, where) if the planner `name` can be loaded here: a local folder, a copy in the Hugging Face cache, or
    the hub answering; else (False, why). Asks the hub (5 s at most) only when the cache has no copy and the hub is
    not switched off with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    if (Path(name) / "config.json").exists():
        return True, f"local folder {name}"
    weights = ("model.safetensors.index.json", "model.safetensors")
    if isinstance(try_to_load_from_cache(name, "config.json"), str) and \
            any(isinstance(try_to_load_from_cache(name, w), str) for w in weights):
        return True, f"{name} is in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        return False, f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE=1"
    try:
        model_info(name, timeout=5)
    except Exception as e:  # no network, a proxy, a typo: any of them means the planner cannot be had now
        return False, f"{name} is not in the Hugging Face cache and the hub did not answer ({type(e).__name__})"
    return True, f"{name} is on the hub (downloaded on first use)"


def processor(folder, max_pixels=MAX_PIXELS):
    """Qwen2.5-VL's processor with the PIL image processor. The stock class checks that its video processor is
    the torchvision one, which this project cannot install; the planner never sees video, so skip that check."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    class Processor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return type(arg)

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    images = Qwen2VLImageProcessorPil.from_pretrained(folder, max_pixels=max_pixels,
                                                      min_pixels=min(max_pixels, 56 * 56))
    return Processor(image_processor=images, tokenizer=tok)


def tiny_folder(folder, seed=0, hidden=64, layers=2, intermediate=None, vocab=None):
    """A random tiny Qwen2.5-VL (vision tower, merger, mrope language model) with a byte-level BPE tokenizer
    trained in-process and the real image processor's settings, saved to `folder`; built offline. `vocab` larger
    than the tokenizer's 320 tokens gives the output layer a real model's width (the extra ids decode to nothing)."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["<action>brighten; blur</action><subject>whole image; background</subject><goal>slightly</goal>",
              "make her coat scarlet and blur the background. Score 0 1 2 3 4 5 6 7 8 9 10", "system user assistant"]
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    half = hidden // 4 // 2  # rotary frequencies per head: 1/4 time, 3/8 height, 3/8 width, as the 7B's 16/24/24
    text = dict(vocab_size=max(len(tok), vocab or 0), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                initializer_range=0.3,
                rope_parameters=dict(rope_type="default", mrope_section=[half // 4, 3 * half // 8, 3 * half // 8],
                                     rope_theta=10000.0),
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                              pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)

    def build(tmp):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
        # as Qwen2.5-VL's own generation_config.json: a completion also stops at <|endoftext|>
        model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        Qwen2VLImageProcessorPil(max_pixels=MAX_PIXELS).save_pretrained(tmp)

    return atomic_folder(folder, build)


def load(name=MODELS["7b"], lora_r=64, lora_alpha=128, lora_dropout=0.0, adapter=None, device="cpu",
         dtype=torch.bfloat16, max_pixels=MAX_PIXELS, quantize=True, lora_targets=LORA_NAMES):
    """Qwen2.5-VL (a hub id or a folder) as a planner.Planner: NF4 language model + LoRA, frozen vision tower.
    `adapter`: a saved LoRA folder to go on training (or to evaluate) instead of a fresh one."""
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                           bnb_4bit_use_double_quant=True, llm_int8_skip_modules=SKIP_4BIT) if quantize else None
    try:
        proc = processor(name, max_pixels)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, quantization_config=q, dtype=dtype,
                                                                   device_map={"": device})
    except OSError as e:
        raise hub_error(name, e) from e
    no_avx512_repack(model)
    model.config.use_cache = True
    for p in model.parameters():  # base and vision tower frozen; only LoRA trains
        p.requires_grad_(False)
    from peft import LoraConfig, PeftModel, get_peft_model
    if adapter:
        policy = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    else:
        policy = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                  target_modules=lora_regex(lora_targets),
                                                  task_type="CAUSAL_LM"))
    return Planner(model=model, tok=proc.tokenizer, policy=policy, processor=proc)


@dataclass
class Vision:
    """The images of a batch of prompts, as the language model consumes them."""
    feats: list            # B tensors (n_i, hidden): prompt i's image features (vision tower + merger), no grad
    grid: torch.Tensor     # (B, 3) image_grid_thw: each image's (time, height, width) patch grid
    token_id: int          # the image-pad token the features replace
    rope_index: object     # the model's get_rope_index: 3-D positions for a batch of prompts

    def subset(self, rows):
        return Vision([self.feats[i] for i in rows], self.grid[rows], self.token_id, self.rope_index)

    def inputs(self, embed, ids, attn):
        """(inputs_embeds (B, L, H), positions (3, B, L)) for left-padded prompt ids (B, L) and their mask."""
        x = embed(ids)
        feats = torch.cat(self.feats).to(x.device, x.dtype)
        slots = ids == self.token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} image tokens in the prompts, {feats.shape[0]} image features")
        x = x.masked_scatter(slots[..., None], feats)
        pos, _ = self.rope_index(ids, mm_token_type_ids=slots.int(), image_grid_thw=self.grid.to(ids.device),
                                 attention_mask=attn)
        return x, pos


def prompts(planner, instructions, images, system=None):
    """Token ids (B lists, the image's pad tokens expanded) and the Vision of B (request, PIL image) pairs."""
    proc = planner.processor
    system = system or rollout.SYSTEM
    texts = [proc.tokenizer.apply_chat_template(
        [{"role": "system", "content": system},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Request: {x}"}]}],
        add_generation_prompt=True, tokenize=False) for x in instructions]
    return _encode(planner, texts, [[im] for im in images])


def _encode(planner, texts, images):
    proc = planner.processor
    b = proc(text=texts, images=[im for ims in images for im in ims], padding=True, return_tensors="pt")
    ids = [row[m.bool()].tolist() for row, m in zip(b["input_ids"], b["attention_mask"])]
    visual = planner.model.model.visual
    with torch.no_grad():
        out = planner.model.model.get_image_features(b["pixel_values"].to(visual.device),
                                                     b["image_grid_thw"].to(visual.device))
    per_image = list(out.pooler_output)
    feats = [torch.cat(per_image[sum(map(len, images[:i])):sum(map(len, images[:i + 1]))]) for i in range(len(images))]
    grid = b["image_grid_thw"]
    return ids, Vision(feats, grid, proc.image_token_id, planner.model.model.get_rope_index)


# ----------------------------------------------------------------------------------------------------------------
# The local judge.

JUDGE = "You judge image edits. The first image is before the edit, the second after it."
QUESTIONS = {
    "completion": "How completely does the second image carry out the request?",
    "quality": "How good is the visual quality of the second image (no artefacts, distortions or blur)?",
    "preservation": "How well does the second image keep everything the request did not ask to change?",
}


def score_tokens(tok):
    """Token ids of '0'..'9', and of '10' if the tokenizer has it as one token (Qwen writes digits one by one)."""
    ids = [tok.convert_tokens_to_ids(str(k)) for k in range(11)]
    if any(i is None or i == tok.unk_token_id for i in ids[:10]):
        raise ValueError("the judge needs the digits 0-9 as single tokens")
    return ids[:10], (ids[10] if ids[10] not in (None, tok.unk_token_id) else None)


def expected_score(probs, p0=None):
    """Expected score (n,) from the probabilities (n, 11) of the tokens '0'..'10', or (n, 10) of '0'..'9' and
    p0 (n,) = P('0' | '1'): then '1' splits into one (1 - p0) and ten (p0). Renormalised over the score tokens."""
    if p0 is not None:
        p0 = p0[:, None]
        probs = torch.cat([probs[:, :1], probs[:, 1:2] * (1 - p0), probs[:, 2:], probs[:, 1:2] * p0], 1)
    probs = probs / probs.sum(-1, keepdim=True)
    return probs @ torch.arange(11, dtype=probs.dtype, device=probs.device)


@torch.no_grad()
def judge(planner, requests, befores, afters, batch=6):
    """Scores (N, 3) in [0, 10] for completion, quality and preservation of N edits (PIL images), from the base
    model with the adapter off. Each row is the expected score under the next-token distribution."""
    tok, pad = planner.tok, planner.tok.pad_token_id
    digits, ten = score_tokens(tok)
    jobs = [(r, b, a, q) for r, b, a in zip(requests, befores, afters) for q in QUESTIONS.values()]
    scores = []
    planner.policy.eval()
    for i in range(0, len(jobs), batch):
        part = jobs[i:i + batch]
        texts = [tok.apply_chat_template(
            [{"role": "system", "content": JUDGE},
             {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text":
                f"Request: {r}\n{q} Answer with one score from 0 (not at all) to 10 (perfectly)."}]}],
            add_generation_prompt=True, tokenize=False) + "Score: " for r, _, _, q in part]
        ids, vision = _encode(planner, texts, [[b, a] for _, b, a, _ in part])
        with planner.policy.disable_adapter():
            out, attn, pos = rollout.prefill(planner.policy, ids, pad, vision)
            probs = out.logits[:, -1].float().softmax(-1)[:, digits + ([ten] if ten is not None else [])]
            p0 = None
            if ten is None:  # '1' then '0' is ten: the next step after '1' gives P('0' | '1')
                one = torch.full((len(part), 1), digits[1], device=attn.device)
                nxt = planner.policy(input_ids=one, attention_mask=torch.cat([attn, torch.ones_like(one)], 1),
                                     position_ids=pos[..., -1:] + 1, past_key_values=out.past_key_values,
                                     use_cache=True, logits_to_keep=1)
                p0 = nxt.logits[:, -1].float().softmax(-1)[:, digits[0]]
        scores.append(expected_score(probs, p0))
    return torch.cat(scores).view(len(requests), len(QUESTIONS)).cpu()
