"""
The memory plan: what each part of the RL loop (and of edit.py) holds in memory, computed from model configs before
any weight is loaded, which parts are resident in each phase, and a meter that measures the same phases in a run.

    python train.py --preset=gpu24 --dry_run=True        # the plan for one 24 GB GPU; needs no GPU and no weights
    python train.py --preset=gpu24 --dry_run=True --group_size=16 --max_pixels=200704   # what a change costs
    est = memory.estimate(cfg, model_config, prompt_len, device="cuda")   # {"parts": {...}, "phases": {...}}
    meter = memory.Meter("cuda"); with meter.phase("update"): ...          # measured peaks, the same phases

How each part is computed (b = bytes per element of the compute dtype: 2 for bf16 on a GPU, 4 for fp32 on a CPU;
N = tokens of a pass; S = tokens of one sequence, prompt + max_new_tokens; H, I, V = hidden, MLP and vocab sizes):
  weights    the model built on the meta device from its config (configs/*.json, or the local folder's
             config.json): the language model's Linear layers in NF4 = 0.5 byte per weight + 1 byte per block of 64
             (8-bit absmax) + 4 bytes per 64 * 256 (the absmax's own scale); embeddings, lm_head, norms, biases and
             the vision tower at b.
  lora       r * (in + out) per adapted layer, fp32 (peft keeps adapters in fp32 on a bf16 base); its gradient
             (fp32) during the update; optimizer state 8 bytes per weight (AdamW, CPU) or 2 (paged 8-bit AdamW).
  kv cache   sequences x tokens x layers x 2 (keys, values) x kv_heads x head_dim x b: the B prompts' cache after
             the prefill and the B*G copies it is repeated into, which grow to S tokens while decoding.
  prefill    one decoder layer without grad over the B prompts: residual, norm and attention projections (4H),
             MLP gate, up and product (3I) per token at b, plus the largest 4-bit weight dequantized for its matmul.
  update     one micro-batch of micro_groups*G sequences. With gradient checkpointing, each layer's input (N H b per
             layer) is kept, and on top of it either the backward of one recomputed layer (7H + 6I per token at b,
             measured on the CPU; a GPU adds RMSNorm's fp32 copies, 8H bytes) or the completion logits
             (micro-batch x (max_new_tokens + 1) x V elements: fp32 logits and their gradient, 8 bytes, plus b for
             the bf16 logits on a GPU; the log-probs are gathered minus a log-sum-exp, with no log-softmax tensor),
             whichever is larger: they are not alive together.
             Without checkpointing, every layer's buffers.
  vision     the frozen vision tower's forward over one prompt batch (no grad; freed before decoding).
  eval, judge  the KV cache and prefill of one evaluation batch, or of 6 judge prompts with two images each.
Each phase's peak is its largest such moment (`moments` in `estimate`); the coefficients were fitted on the CPU by
changing one size at a time (MLP width, layers, prompt length, vocabulary), see the README.

What is left out: the CUDA context and kernels (about 0.5 GB, in `nvidia-smi`, not in torch's counters), allocator
fragmentation (reserved - allocated), and small buffers (rope tables, masks). Measured peaks are compared with the
estimate in tests/test_memory.py (CPU, a small random Qwen2.5-VL) and by gpu_check.py (the real 7B architecture).
"""
import functools
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import rollout
from vlm import MODELS, lora_regex

CONFIGS = Path(__file__).parent / "configs"
GB = 2**30
QWEN_7B = MODELS["7b"]
CONFIG_FILES = {QWEN_7B: "qwen2.5-vl-7b-instruct.json", MODELS["3b"]: "qwen2.5-vl-3b-instruct.json"}


def native_bf16(device):
    """Whether `device` multiplies bf16 natively: a CUDA GPU, or a CPU with AVX512-BF16 or AMX."""
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text() if kind == "cpu" else ""
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def compute_dtype(device, dtype="auto"):
    """The planner's compute dtype on `device`: "bfloat16", "float32", or "auto": bf16 where native, else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def pick_device(name="auto", dtype="auto"):
    """(device, dtype, why): the one place where the run's device and the planner's compute dtype are chosen; every
    entry point calls it once, prints the reason and passes both down. "auto" is the CUDA GPU if there is one.
    bf16 where the device multiplies it natively (a GPU; a CPU with AVX512-BF16 or AMX, where the cpu planner's
    GRPO update runs 1.85x faster than in fp32), fp32 elsewhere (and on the tests' emulated device); `dtype`
    ("bfloat16" or "float32") overrides that."""
    if name == "auto":
        name, why = ("cuda", torch.cuda.get_device_name(0)) if torch.cuda.is_available() else ("cpu", "no CUDA GPU")
    else:
        why = "asked for"
    cuda = torch.device(name).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"error: device {name!r} asked for, but this machine has no CUDA GPU")
    if cuda:  # cuDNN's attention backward returns NaN for a query row masked entirely (a left-padded prompt's pads):
        torch.backends.cuda.enable_cudnn_sdp(False)  # seen on an H200 (torch 2.11); the other SDPA kernels are fine
    return name, compute_dtype(name, dtype), why


def free_bytes(device):
    """Memory free for new tensors on `device`: the GPU's free memory, else the machine's MemAvailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def planner_config(name):
    """The config dict of a planner: a local folder's config.json, else the copy in configs/ of a known hub id."""
    p = Path(name) / "config.json"
    if p.exists():
        return json.loads(p.read_text())
    if name in CONFIG_FILES:
        return json.loads((CONFIGS / CONFIG_FILES[name]).read_text())
    raise ValueError(f"no config for {name!r}: pass a local folder, or one of {', '.join(CONFIG_FILES)}")


def _meta_vlm(config):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))


def nf4_bytes(n):
    return n / 2 + n / 64 + 4 * n / (64 * 256)


def weights(model, b, skip=("visual", "lm_head"), only=""):
    """(bytes of a model whose Linear layers outside `skip` (and inside `only`, a name prefix) are NF4 and the rest
    at b, the largest 4-bit layer's size)."""
    total, q4, largest = 0, set(), 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not any(s in name for s in skip) and name.startswith(only):
            q4.add(f"{name}.weight")
            total += nf4_bytes(m.weight.numel())
            largest = max(largest, m.weight.numel())
    total += sum(p.numel() * b for n, p in model.named_parameters() if n not in q4)
    return total, largest


def estimate(cfg, config, prompt_len, device="cuda"):
    """The memory plan of a train.py Config for a Qwen2.5-VL planner of `config` (a dict) and prompts of
    `prompt_len` tokens (image tokens included). Returns {"parts": {name: bytes}, "phases": {phase: {name: bytes}},
    "peak": (phase, bytes)}; a phase's parts are resident together at its peak."""
    model = _meta_vlm(config)
    t, vis = model.config.text_config, model.config.vision_config
    H, I, V, L = t.hidden_size, t.intermediate_size, t.vocab_size, t.num_hidden_layers
    kv_tok = L * 2 * t.num_key_value_heads * (getattr(t, "head_dim", None) or H // t.num_attention_heads)
    cuda = torch.device(device).type == "cuda"  # "cuda:1" too
    b = compute_dtype(device, cfg.dtype).itemsize
    w, largest = weights(model, b)
    targets = re.compile(lora_regex(cfg.lora_targets))
    n_lora = sum(cfg.lora_r * (m.in_features + m.out_features) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and targets.fullmatch(n))
    B, G, T, E = cfg.batch_prompts, cfg.group_size, cfg.max_new_tokens, cfg.eval_batch
    P, S = prompt_len, prompt_len + T
    M = min(cfg.micro_groups, B) * G                      # sequences per backward pass
    # One decoder layer without grad over n tokens: residual, norm, attention projections (4H), MLP gate, up and
    # their product (3I), plus the largest 4-bit weight dequantized for its matmul.
    layer = lambda n: n * (4 * H + 3 * I) * b + largest * b  # noqa: E731
    # With grad (the layer recomputed in the backward of gradient checkpointing): the tensors autograd saves and
    # their gradients, measured on the CPU as 7H + 6I per token; on a GPU RMSNorm also keeps fp32 copies (2 x 4H).
    layer_grad = lambda n: n * ((7 * H + 6 * I) * b + (8 * H if b == 2 else 0))  # noqa: E731
    # Completion logits, per element: fp32 logits (a copy if b is not fp32) and their gradient (rollout.token_logp
    # makes no log-softmax tensor).
    logit = 8 + (b if b != 4 else 0)
    parts = {  # name: (bytes, what it is)
        "weights": (w, "planner weights"),
        "lora": ((4 + (2 if cuda else 8)) * n_lora, "LoRA weights + optimizer state"),
        "lora_grad": (4 * n_lora, "LoRA gradients"),
        "prompt_kv": (B * P * kv_tok * b, f"prompt KV cache ({B} prompts)"),
        "group_kv": (B * G * S * kv_tok * b, f"group KV cache ({B}x{G} x {S} tokens)"),
        "prefill": (layer(B * P), f"prefill ({B} x {P} tokens)"),
        "vision": (B * (cfg.max_pixels // vis.patch_size ** 2) * (4 * vis.hidden_size + 3 * vis.intermediate_size)
                   * b, f"vision tower ({B} images)"),
        "kept": (M * S * H * b * L if cfg.grad_checkpointing else 0, f"checkpointed layer inputs ({M} x {S} tokens)"),
        "backward": (layer_grad(M * S) * (1 if cfg.grad_checkpointing else L),
                     "backward of one layer" if cfg.grad_checkpointing else "activations of every layer"),
        "logits": (M * (T + 1) * V * logit, f"completion logits ({M} x {T + 1} x {V})"),
        "eval": (E * S * kv_tok * b + layer(E * P), f"evaluation KV cache + prefill ({E} prompts)"),
    }
    # Each phase's largest moment, as lists of the parts alive together on top of weights and LoRA state. Sampling:
    # the prefill, or the group's cache being copied from the prompts'; the update: the logits or one layer's
    # backward, on top of the kept layer inputs.
    moments = {"vision": [["vision"]], "sample": [["prompt_kv", "prefill"], ["prompt_kv", "group_kv"]],
               "eval": [["eval"]], "update": [["lora_grad", "kept", "backward"], ["lora_grad", "kept", "logits"]]}
    if cfg.reward == "judge":  # vlm.judge: 6 prompts at a time, each with the images before and after the edit
        J = P + 2 * (cfg.outcome_size // 28) ** 2
        parts["judge"] = (6 * J * kv_tok * b + layer(6 * J), "judge prefill (6 prompts, 2 images each)")
        moments["judge"] = [["judge"]]
    labels = {k: label for k, (_, label) in parts.items()}
    parts = {k: v for k, (v, _) in parts.items()}
    phases = {ph: {x: parts[x] for x in ["weights", "lora"] + max(opts, key=lambda o: sum(parts[x] for x in o))}
              for ph, opts in moments.items()}
    used = {x: [ph for ph, opts in moments.items() if any(x in o for o in opts)] or ["all"] for x in parts}
    peak = max(((p, sum(v.values())) for p, v in phases.items()), key=lambda x: x[1])
    return {"parts": parts, "phases": phases, "peak": peak, "used": used, "labels": labels}


def prompt_tokens(cfg, tokenizer=None):
    """Tokens of a planner prompt: the system text and a request (chars / 4 without a tokenizer, about Qwen's rate
    on English) plus the image's tokens after the 2x2 merge (max_pixels / 28^2) and the chat markers."""
    text = rollout.SYSTEM + " Request: make her coat scarlet, her hair copper, and blur the background"
    n = len(tokenizer(text)["input_ids"]) if tokenizer is not None else len(text) // 4
    return n + cfg.max_pixels // 28 ** 2 + 16


def flux_plan(config, size=1024, text_tokens=512, b=2):
    """Bytes of FLUX.1-Kontext's transformer editing one `size` px image, from its config: the blocks' Linear
    layers in NF4, the rest at b; activations of one block over the target and reference latents (2 x (size/16)^2
    tokens) and the text tokens: the residual stream, the normed input, q, k, v, attention output and the 4x MLP
    before and after its activation (16 widths per token, no grad), plus the largest NF4 weight dequantized."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    w, largest = 0, 0
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        bw, bl = weights(getattr(model, prefix), b, skip=(), only="")
        w, largest = w + bw, max(largest, bl)
    w += sum(p.numel() * b for n, p in model.named_parameters() if not n.startswith(("transformer_blocks",
                                                                                    "single_transformer_blocks")))
    D = config["num_attention_heads"] * config["attention_head_dim"]
    n = 2 * (size // 16) ** 2 + text_tokens
    return {"weights (blocks in NF4)": w, f"activations ({n} tokens)": n * D * 16 * b + largest * b}


def editor_parts():
    """Bytes of the gpu24 editing and region agents on a GPU (bf16; FLUX's transformer and T5 in NF4, as diffusers
    and transformers quantize them), from configs."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config.from_dict(json.loads((CONFIGS / "t5-v1_1-xxl-encoder.json").read_text())))
    flux = flux_plan(json.loads((CONFIGS / "flux.1-kontext-dev-transformer.json").read_text()))
    # transformers keeps T5's `_keep_in_fp32_modules` (the feed-forward output projections `wo`, a fifth of its
    # weights) out of 4-bit; in fp32 only for fp16 loads, so at b = 2 in bf16: 3.9 GB, not the 2.5 of all-NF4.
    keep = tuple(f".{m}" for m in T5EncoderModel._keep_in_fp32_modules or ())
    # Small parts, published parameter counts (16-bit): CLIP-L text encoder 123M and FLUX's VAE 84M; OWLv2-base 155M
    # and SAM-ViT-base 94M (region agents). The VAE's decode of a 1024 px image is not computed here: diffusers
    # decodes in tiles when asked (pipe.vae.enable_tiling()), else it adds a few GB for a moment.
    return {"FLUX.1-Kontext transformer (NF4)": flux["weights (blocks in NF4)"],
            "FLUX transformer activations (1024 px)": list(flux.values())[1],
            "T5-XXL text encoder (NF4, wo in bf16)": weights(t5, 2, skip=keep)[0],
            "CLIP-L text encoder + VAE (bf16)": (123e6 + 84e6) * 2, "OWLv2 + SAM region agents (fp16)": 249e6 * 2}


def show(cfg):
    """Print the memory plan of cfg (train.py --dry_run=True) and return the estimate."""
    name = cfg.planner or QWEN_7B
    device = "cuda" if cfg.preset == "gpu24" else "cpu"
    tok = None
    if Path(name).is_dir():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
    est = estimate(cfg, planner_config(name), prompt_tokens(cfg, tok), device)
    print(f"memory plan: {name}, preset {cfg.preset} ({device}), B={cfg.batch_prompts} G={cfg.group_size} "
          f"max_new_tokens={cfg.max_new_tokens} max_pixels={cfg.max_pixels} lora_r={cfg.lora_r} "
          f"micro_groups={cfg.micro_groups} grad_checkpointing={cfg.grad_checkpointing}")
    print("  part                                              GB  phases (* resident at the phase's peak)")
    for part, v in est["parts"].items():
        where = [p + ("*" if p == "all" or part in est["phases"][p] else "") for p in est["used"][part]]
        print(f"  {est['labels'][part]:<46} {v / GB:7.2f}  {', '.join(where)}")
    for p, parts in est["phases"].items():
        print(f"  phase {p:<7} {sum(parts.values()) / GB:6.2f} GB: {' + '.join(est['labels'][x] for x in parts)}")
    print(f"peak: {est['peak'][1] / GB:.2f} GB in the {est['peak'][0]} phase "
          f"(+ about 0.5 GB CUDA context); the judge is the planner with its adapter off: no extra weights; the "
          f"outcome reward edits with the CPU editor: no GPU memory")
    if device == "cuda":
        ed = editor_parts()
        print("edit.py on gpu24: the planner is unloaded after sequencing, then region agents and editor load:")
        for part, v in ed.items():
            print(f"  {v / GB:7.2f} GB  {part}")
        print(f"  edit phase {sum(ed.values()) / GB:.2f} GB; planning phase "
              f"{est['parts']['weights'] / GB:.2f} GB")
    return est


def report(meter, cfg, planner, out, prompt_len=None):
    """Print the measured peak of each phase next to the plan's, and write both to out/memory.json."""
    measured = dict(meter.peaks)
    rows = {"device": meter.device, "measured": measured, "seconds": {p: round(v, 1) for p, v in meter.seconds.items()}}
    if meter.kind == "rss":  # the resident set's peak over the whole run, phases and what ran between them
        meter.process_peak = max(meter.process_peak, peak_rss())
        rows["process_peak"], rows["meter_seconds"] = meter.process_peak, round(meter.overhead, 4)
    if meter.reserved:  # on a GPU: what the allocator held, which is what must fit the card
        rows["reserved"] = dict(meter.reserved)
    if planner.processor is not None:  # the plan covers the VLM planner
        config = {k: v for k, v in planner.model.config.to_dict().items() if k != "quantization_config"}
        prompt_len = prompt_len or prompt_tokens(cfg, planner.tok)
        est = estimate(cfg, config, prompt_len, meter.device)
        rows.update(prompt_tokens=prompt_len, estimated={p: sum(v.values()) for p, v in est["phases"].items()})
    print("memory, peak per phase" + (" (measured / planned)" if "estimated" in rows else " (measured)") + ": "
          + ", ".join(f"{p} {v / GB:.2f}" + (f" / {rows['estimated'][p] / GB:.2f}" if p in rows.get("estimated", {})
                                            else "") + " GB" for p, v in measured.items())
          + (f"; the run's peak resident set {rows['process_peak'] / GB:.2f} GB" if "process_peak" in rows else ""))
    (Path(out) / "memory.json").write_text(json.dumps(rows, indent=1))
    return rows


def trim():
    """Give the kernel back the free memory glibc holds (malloc_trim). glibc keeps freed heap memory for reuse, and
    a phase's fragments pile up on the last one's: without this a cpu training run grew to 5.5 GB resident for a
    working set of about 3 GB. Costs milliseconds; a no-op where there is no glibc."""
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def libc():
    import ctypes
    return ctypes.CDLL("libc.so.6")


def peak_rss():
    """The process's peak resident set in bytes (VmHWM), 0 where /proc is not there."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def live_tensor_bytes():
    """Bytes of the CPU tensor storages alive now (each storage once: views and tied weights share one)."""
    import gc
    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
            if o.is_mkldnn:  # oneDNN's opaque layout (engine.Packed): no storage to read, never a view
                seen[id(o)] = o.numel() * o.element_size()
                continue
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class Meter:
    """Measured peak memory per phase, in bytes, of one of three kinds (`kind`; on a GPU any kind but "off" is CUDA's
    allocator peak, torch.cuda.max_memory_allocated, free to read):
    - "rss" (training's default): the kernel's peak resident set of the process during the phase (VmHWM, reset at
      each phase's start through /proc/self/clear_refs). Free to read; it counts the libraries' code and what the
      allocator keeps after freeing, so it is no check of the memory plan. The reset also resets the peak that
      `/usr/bin/time -v` reports (it then shows the last phase's); `process_peak` is the whole run's.
    - "heap" (the memory plan's checks): the tensors alive when the phase begins (a scan of live storages), plus the
      largest growth of glibc's bytes in use (mallinfo2, read by a thread every `interval` seconds), less the tensors
      alive when the meter was made. A reading locks the allocator's arenas while it walks them, so this stalls the
      run (every half millisecond: a cpu step a third slower).
    - "off": phase times only."""

    def __init__(self, device, kind="rss", interval=0.0005):
        if kind not in ("rss", "heap", "off"):
            raise ValueError(f"memory meter kind {kind!r}: rss, heap or off")
        self.device, self.peaks, self.seconds, self.reserved = device, {}, {}, {}
        self.kind = "cuda" if torch.device(device).type == "cuda" and kind != "off" else kind
        self.interval, self.resets, self.process_peak = interval, True, 0
        self.overhead = 0.0  # seconds the rss meter spent reading and resetting the kernel's counters
        if self.kind == "heap":
            self.base = live_tensor_bytes()  # what the process held before the meter: not the run's
            import ctypes

            class Info(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                                          "uordblks fordblks keepcost".split()]
            self._libc = libc()
            self._libc.mallinfo2.restype = Info

    def _heap(self):
        m = self._libc.mallinfo2()
        return m.uordblks + m.hblkhd  # in use: heap chunks and separately mapped large chunks

    def _watch(self):
        while not self._stop.wait(self.interval):
            self._top = max(self._top, self._heap())

    def begin(self, name):
        """Start measuring phase `name` (ends at `end()`); a phase measured several times keeps its largest peak.
        On a CPU each phase first hands the memory glibc kept from the phases before back to the kernel (trim)."""
        import threading
        self.current, self.t = name, time.time()
        if torch.device(self.device).type != "cuda":
            trim()
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            self._rss(reset=True)  # what ran since the last reset, phase or not, goes to process_peak
        elif self.kind == "heap":
            self._live, self._start = live_tensor_bytes(), self._heap()
            self._top, self._stop = self._start, threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()

    def _rss(self, reset):
        """The kernel's peak resident set since its last reset, folded into process_peak; then, with `reset`, reset
        it to the current set ("5" to clear_refs, Linux 4.0+). The time it takes goes to `overhead`."""
        t, peak = time.perf_counter(), peak_rss()
        self.process_peak = max(self.process_peak, peak)
        if reset:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.resets = False  # then each phase reports the process's peak so far
        self.overhead += time.perf_counter() - t
        return peak

    def end(self):
        peak = 0
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved[self.current] = max(self.reserved.get(self.current, 0),
                                              torch.cuda.max_memory_reserved(self.device))
        elif self.kind == "rss":
            peak = self._rss(reset=False)
        elif self.kind == "heap":
            self._stop.set()
            self._thread.join()
            peak = self._live - self.base + max(self._top, self._heap()) - self._start
        name = self.current
        self.peaks[name] = max(self.peaks.get(name, 0), peak)
        self.seconds[name] = self.seconds.get(name, 0) + time.time() - self.t

    @contextmanager
    def phase(self, name):
        self.begin(name)
        try:
            yield
        finally:  # an error inside still stops the sampling thread
            self.end()
