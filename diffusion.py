"""
The diffusers editing agents of the gpu24 preset: three pretrained editors behind one interface, each loaded on
first use.

    import diffusion, torch
    edit = diffusion.Kontext(device="cuda", dtype=torch.bfloat16)     # or Pix2Pix(...), Inpaint(...); loads nothing
    out = edit(image, step, mask, generator=torch.Generator().manual_seed(0))   # loads once, then edits
    #   image: uint8 (H, W, 3) RGB; step: plan.Step (action, subject, goal); mask: (H, W) in [0, 1] or None
    #   out: a new uint8 (H, W, 3) array at the input's size; generator None = seed 0, so the same bytes each time
    edit = diffusion.Kontext(model="/data/FLUX.1-Kontext-dev")          # a local folder instead of the hub id
    agents.LOADERS["kontext"] = diffusion.load_kontext                  # also load_pix2pix, load_inpaint

Which editor for what:
    pix2pix  InstructPix2Pix (timbrooks/instruct-pix2pix, SD 1.5 size): a global edit from an instruction such as
             "make the coat scarlet"; good at colour, tone, style, season; weak at precise object changes. Fast.
    inpaint  SD inpainting (stable-diffusion-v1-5/stable-diffusion-inpainting): repaints the masked region from a
             description ("a scarlet coat"); needs a mask. For remove (the fill is described as empty background
             and the subject is the negative prompt), replace background, recolor or replace an object.
    kontext  FLUX.1-Kontext-dev (black-forest-labs/FLUX.1-Kontext-dev, gated: accept its licence on the hub before
             downloading), the paper's editor: the best instruction following and preservation; the slowest.

With a mask, each editor's result is blended into the input through the CPU editor's feather (editor.feather):
pixels more than editor.margin(shape) from the mask (twice that for inpaint's remove, whose hole is grown like the
CPU editor's) come back byte-identical, even though the VAE round trip changes every pixel it touches. Without a
mask the whole frame is the edit (pix2pix, kontext). The image is resized to the working size (longest side
`size`, aspect kept, sides multiples of 8 for SD and 16 for FLUX) and the result back to the input's size.

Memory (weights, about): pix2pix and inpaint in float16 2.7 GB each (UNet 1.7, CLIP text 0.25, VAE 0.17, safety
checker 0.6); kontext with quantize=True (the default on a GPU) 10 GB: transformer in NF4 6.7 GB, T5-XXL in NF4
3 GB, CLIP and VAE in bfloat16 0.4 GB (in bfloat16 without NF4: 33 GB). offload=True moves each component to the GPU
only while it runs (accelerate's model CPU offload): peak about the largest component, slower.
NF4 needs a GPU: diffusers 0.42 refuses bitsandbytes without one ("No GPU found. A GPU is needed for
quantization."), though bitsandbytes 0.50 itself runs NF4 on the CPU (the tests show it past that check).

Simplified: the editors see one sub-request at a time, never the earlier ones; prompts are built from templates
(`instruction`, `describe`), not written by a model; the mask is a hard region plus a fixed feather, so a global
editor's colour shifts near the mask edge are cut off rather than matched; the safety checker the SD models ship
with is kept, and a blanked result is an error, not a black image.
"""
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

import editor
from editor import EditError
from planner import no_avx512_repack


class MissingModel(OSError):
    """A model that is neither a local folder nor in the Hugging Face cache, with the hub unreachable or offline."""


def work_size(shape, size, multiple):
    """(h, w) for the pipeline: longest side `size`, aspect kept, both multiples of `multiple` (at least one)."""
    h, w = shape[:2]
    s = size / max(h, w)
    return tuple(max(multiple, round(n * s / multiple) * multiple) for n in (h, w))


def nf4(components, dtype):
    """The quantization config for `from_pretrained`: `components` in bitsandbytes NF4, computing in `dtype`.
    diffusers builds its own BitsAndBytesConfig for its models (the FLUX transformer, a UNet) and transformers'
    one for transformers models (the T5 encoder) from the same arguments."""
    from diffusers import PipelineQuantizationConfig
    return PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", components_to_quantize=list(components),
                                      quant_kwargs=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=dtype,
                                                        # the absmax's own 8-bit scale: 0.5 GB less on FLUX
                                                        bnb_4bit_use_double_quant=True))


# Instruction editors read commands; "recolor the coat: scarlet" reads worse to them than "make the coat scarlet".
INSTRUCTIONS = {"recolor": "make the {subject} {goal}", "remove": "remove the {subject}",
                "replace background": "replace the background with {goal}"}


def instruction(step):
    """The command given to pix2pix and kontext: 'make the coat scarlet', 'blur the background strongly'."""
    goal = "" if step.goal == "full" else step.goal
    text = INSTRUCTIONS.get(step.action, "{action} the {subject} {goal}")
    return " ".join(text.format(action=step.action, subject=step.subject, goal=goal).split())


def describe(step):
    """(prompt, negative prompt) for inpainting: what the masked region should show after the edit."""
    if step.action == "remove":  # describe the emptiness, and push away from what was there
        return "empty background, seamless continuation of the surroundings", step.subject
    if step.action == "replace background":
        return f"{step.goal} background", None
    if step.action == "recolor":
        return f"a {step.goal} {step.subject}", None
    return " ".join(f"{step.subject}, {step.action} {'' if step.goal == 'full' else step.goal}".split()), None


def _pil(x, hw, resample=Image.BICUBIC):
    """uint8 array -> PIL image of size (h, w); a mask in [0, 1] becomes an 'L' image."""
    im = Image.fromarray(x if x.dtype == np.uint8 else np.rint(x * 255).astype(np.uint8))
    return im if im.size == (hw[1], hw[0]) else im.resize((hw[1], hw[0]), resample)


class DiffusionEditor:
    """One diffusers pipeline as an editing agent. Subclasses set the class attributes and `_edit`."""
    name = model = pipeline = ""  # registry name, default hub id, diffusers pipeline class
    multiple, steps, guidance, size = 8, 20, 7.5, 512  # working sides' multiple, denoising steps, CFG, longest side
    nf4_parts = ("unet",)  # what quantize=True loads in NF4

    def __init__(self, model=None, device="cpu", dtype=torch.float32, steps=None, guidance=None, size=None,
                 quantize=False, offload=False):
        self.model = str(model or type(self).model)  # a hub id or a folder (a Path is fine)
        self.device, self.dtype, self.quantize, self.offload = device, dtype, quantize, offload
        self.steps, self.guidance = steps or self.steps, self.guidance if guidance is None else guidance
        self.size = size or self.size
        self.pipe = None  # loaded by the first call (or load()): building an editor costs nothing

    def load(self):
        """from_pretrained on first use; later calls return the same pipeline."""
        if self.pipe is not None:
            return self.pipe
        try:
            import diffusers
        except ImportError as e:
            raise ImportError("the diffusion editors need diffusers: pip install diffusers==0.42.1 accelerate") from e
        kw = dict(dtype=self.dtype)
        if self.quantize:
            kw["quantization_config"] = nf4(self.nf4_parts, self.dtype)
        try:
            pipe = getattr(diffusers, self.pipeline).from_pretrained(self.model, **kw)
        except (OSError, ValueError) as e:  # not cached and the hub offline, a missing folder or file
            raise MissingModel(
                f"{self.name}: cannot load {self.model!r} ({type(e).__name__}: {str(e)[:300]}). If it is not "
                f"downloaded: on a machine with network run `huggingface-cli download {self.model}` (`hf download` "
                "in newer huggingface_hub), then use the same HF_HOME cache here, or pass the downloaded folder as "
                "model=...") from e
        except RuntimeError as e:
            if self.quantize:  # diffusers' bitsandbytes backend refuses to run without a GPU, though bnb could
                raise RuntimeError(f"{self.name}: loading {self.model} with {', '.join(self.nf4_parts)} in NF4 "
                                   f"failed: {e} On the CPU pass quantize=False.") from e
            raise
        if self.quantize:  # bitsandbytes' in-place AVX512-BF16 repack on CPUs that have it breaks NF4 layers
            for part in self.nf4_parts:
                no_avx512_repack(getattr(pipe, part))
        if self.offload:
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)  # called inside loops: a bar per edit would flood the log
        self.pipe = pipe
        return pipe

    def __call__(self, image, step, mask=None, generator=None):
        """Edit `image` (uint8 (H, W, 3)) for one sub-request; returns a new uint8 array of the same shape."""
        img, mask = editor.check(image, mask)
        mask = self._region(step, mask)  # checked before loading: a bad request fails fast
        hw = work_size(img.shape, self.size, self.multiple)
        pipe = self.load()
        if generator is None:  # same inputs, same bytes, like the CPU editor; pass a generator for variety
            generator = torch.Generator().manual_seed(0)
        out = self._edit(pipe, _pil(img, hw), step, mask, hw, generator)
        if getattr(out, "nsfw_content_detected", None) and any(out.nsfw_content_detected):
            raise EditError(f"{self.name}: the safety checker blanked the result of {step.text!r}")
        edited = np.asarray(_pil(np.clip(out.images[0], 0, 1), img.shape[:2]), np.float32)
        if mask is None:
            return np.clip(np.rint(edited), 0, 255).astype(np.uint8)
        m = editor.feather(mask, editor.feather_radius(img.shape))[..., None]
        return np.clip(np.rint(img + (edited - img) * m), 0, 255).astype(np.uint8)  # m == 0 gives img exactly

    def _region(self, step, mask):
        """The mask the result is blended through (and inpaint repaints); None = the whole frame."""
        return mask

    def _edit(self, pipe, pil, step, mask, hw, generator):
        raise NotImplementedError


class Pix2Pix(DiffusionEditor):
    name, model, pipeline = "pix2pix", "timbrooks/instruct-pix2pix", "StableDiffusionInstructPix2PixPipeline"
    image_guidance = 1.5  # how closely the result keeps to the input image (the paper's s_I)

    def _edit(self, pipe, pil, step, mask, hw, generator):
        return pipe(prompt=instruction(step), image=pil, num_inference_steps=self.steps, guidance_scale=self.guidance,
                    image_guidance_scale=self.image_guidance, generator=generator, output_type="np")


class Inpaint(DiffusionEditor):
    name, model, pipeline = "inpaint", "stable-diffusion-v1-5/stable-diffusion-inpainting", \
        "StableDiffusionInpaintPipeline"
    steps = 30

    def _region(self, step, mask):
        if mask is None or mask.max() <= 0.5:
            raise EditError(f"inpaint needs a region: pass the mask of what {step.text!r} repaints "
                            f"({'an empty mask' if mask is not None else 'None'} would repaint nothing)")
        hole = (mask > 0.5).astype(np.uint8)
        if step.action == "remove":  # as the CPU editor: grow the hole so the object's own edge is replaced too
            grow = 2 * editor.margin(mask.shape) + 1
            hole = cv2.dilate(hole, np.ones((grow, grow), np.uint8))
        return hole.astype(np.float32)

    def _edit(self, pipe, pil, step, mask, hw, generator):
        prompt, negative = describe(step)
        hole = _pil(mask, hw, Image.NEAREST)  # white = repaint
        return pipe(prompt=prompt, negative_prompt=negative, image=pil, mask_image=hole, height=hw[0], width=hw[1],
                    strength=1.0, num_inference_steps=self.steps, guidance_scale=self.guidance, generator=generator,
                    output_type="np")


class Kontext(DiffusionEditor):
    name, model, pipeline = "kontext", "black-forest-labs/FLUX.1-Kontext-dev", "FluxKontextPipeline"
    multiple, steps, guidance, size = 16, 28, 2.5, 1024  # FLUX packs 2x2 latents of an 8x VAE; BFL's defaults
    nf4_parts = ("transformer", "text_encoder_2")  # the 12 B transformer and T5-XXL: 33 GB -> 10 GB

    def __init__(self, model=None, device="cpu", dtype=torch.bfloat16, quantize=True, **kw):
        super().__init__(model, device, dtype, quantize=quantize, **kw)

    def _edit(self, pipe, pil, step, mask, hw, generator):
        # _auto_resize=False: the pipeline would otherwise snap the input to one of its ~1 Mpx training sizes;
        # we chose the working size ourselves (and max_area = h * w keeps the output at it).
        return pipe(image=pil, prompt=instruction(step), height=hw[0], width=hw[1], max_area=hw[0] * hw[1],
                    num_inference_steps=self.steps, guidance_scale=self.guidance, generator=generator,
                    output_type="np", _auto_resize=False)


EDITORS = {"pix2pix": Pix2Pix, "inpaint": Inpaint, "kontext": Kontext}


def load_editor(name, **kw):
    """EDITORS[name] on this machine, loaded now: CUDA in float16 (bfloat16 and NF4 for kontext) when there is a
    GPU, else the CPU in float32 without NF4 (diffusers' bitsandbytes backend needs a GPU; minutes per edit)."""
    cuda = torch.cuda.is_available()
    defaults = dict(device="cuda" if cuda else "cpu", dtype=torch.float32)
    if cuda:
        defaults["dtype"] = torch.bfloat16 if name == "kontext" else torch.float16
    if name == "kontext":
        defaults["quantize"] = cuda
    defaults.update(kw)
    print(f"{name} editor: {defaults['device']} {str(defaults['dtype']).replace('torch.', '')}"
          + (" + NF4" if defaults.get("quantize") else "") + (" (CUDA GPU)" if cuda else " (no CUDA GPU: slow)"))
    edit = EDITORS[name](**defaults)
    edit.load()  # the registry calls a loader when the agent is first needed: load now, so the time is counted
    return edit


def load_pix2pix():
    return load_editor("pix2pix")


def load_inpaint():
    return load_editor("inpaint")


def load_kontext():
    return load_editor("kontext")


# ----------------------------------------------------------------------------------------------------------------
# Tiny random pipelines of the editors' real classes, built offline (tests and gpu_check.py). The tokenizers are built
# in process: one token per character (CLIP BPE without merges, a T5 unigram over single characters), which is all a
# random text encoder needs.

TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,:;'-!?#"


def clip_tokenizer():
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in TINY_CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in TINY_CHARS] + [("\u2581" + c, -2.5) for c in TINY_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_text(seed):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=2 + 2 * len(TINY_CHARS), projection_dim=32))


def sd_parts(in_channels):
    """InstructPix2Pix's UNet reads 8 channels (noisy latents + image latents), inpainting's 9 (+ mask)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                                in_channels=in_channels, out_channels=4, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return dict(unet=unet, vae=vae, text_encoder=clip_text(1), tokenizer=clip_tokenizer(),
                scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def kontext_parts():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    t5 = T5EncoderModel(T5Config(vocab_size=4 + 2 * len(TINY_CHARS), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4))
    return dict(transformer=transformer, vae=vae, text_encoder=clip_text(2), tokenizer=clip_tokenizer(),
                text_encoder_2=t5, tokenizer_2=t5_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(),
                image_encoder=None, feature_extractor=None)


def tiny_folder(folder, name):
    """A tiny random pipeline of EDITORS[name]'s class saved to `folder` with save_pretrained (built once; a later
    call returns the folder), so the editor loads it through the same from_pretrained path as a hub id."""
    import diffusers
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    parts = {"pix2pix": lambda: sd_parts(8), "inpaint": lambda: sd_parts(9), "kontext": kontext_parts}[name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.")  # renamed when complete: never half a folder
    try:
        with torch.random.fork_rng():  # the builders seed torch: the caller's random stream is left alone
            getattr(diffusers, EDITORS[name].pipeline)(**parts()).save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
