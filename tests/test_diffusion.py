"""The diffusers editors on tiny random pipelines of the real classes, built offline, saved with save_pretrained and
loaded through the same from_pretrained path as the hub ids (a folder instead of an id)."""
import numpy as np
import pytest
import torch

import diffusion
from agents import Step
from editor import EditError

IMG = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)  # not square, not a multiple of 8
MASK = np.zeros(IMG.shape[:2], np.float32)
MASK[10:30, 10:30] = 1
RECOLOR = Step("recolor", "coat", "scarlet")
FAST = dict(steps=2, size=32)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,:;'-!?#"


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Tiny pipelines. The tokenizers are built in process: one token per character (CLIP BPE without merges, a T5
# unigram over single characters), which is all a random text encoder needs.

def clip_tokenizer():
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_text(seed):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=2 + 2 * len(CHARS), projection_dim=32))


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
    t5 = T5EncoderModel(T5Config(vocab_size=4 + 2 * len(CHARS), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4))
    return dict(transformer=transformer, vae=vae, text_encoder=clip_text(2), tokenizer=clip_tokenizer(),
                text_encoder_2=t5, tokenizer_2=t5_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(),
                image_encoder=None, feature_extractor=None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import diffusers
    root, out = tmp_path_factory.mktemp("diffusion"), {}
    for name, parts in [("pix2pix", lambda: sd_parts(8)), ("inpaint", lambda: sd_parts(9)),
                        ("kontext", kontext_parts)]:
        cls = getattr(diffusers, diffusion.EDITORS[name].pipeline)  # the class the editor loads with
        cls(**parts()).save_pretrained(root / name)
        out[name] = root / name
    return out


def make(name, folder, **kw):
    if name == "kontext":  # diffusers' NF4 needs a GPU (tested below); float32 because the CPU is slow in bf16
        kw = dict(dtype=torch.float32, quantize=False, **kw)
    return diffusion.EDITORS[name](folder, **FAST, **kw)


@pytest.fixture(scope="module")
def editors(folders):
    return {name: make(name, folder) for name, folder in folders.items()}


# ----------------------------------------------------------------------------------------------------------------
# Behaviour

@pytest.mark.parametrize("name", ["pix2pix", "inpaint", "kontext"])
def test_shape_seeds_and_mask(editors, name, capfd):
    ed, before = editors[name], IMG.copy()
    ed.load()  # its own "Loading pipeline components" bar is not the one checked here
    capfd.readouterr()
    a = ed(IMG, RECOLOR, MASK, gen(0))
    assert "it/s" not in capfd.readouterr().err  # the denoising loop's progress bar is off
    assert ed.pipe._progress_bar_config == {"disable": True}
    assert a.dtype == np.uint8 and a.shape == IMG.shape
    assert np.array_equal(IMG, before)  # the input is never changed
    assert np.array_equal(a, ed(IMG, RECOLOR, MASK, gen(0)))  # same seed, same bytes
    b = ed(IMG, RECOLOR, MASK, gen(1))
    assert np.abs(a.astype(int) - b).max() > 10  # another seed, another edit
    # Outside the mask, beyond the feather's reach (2 px here), the input comes back byte-identical;
    # inside, the diffusion result shows.
    assert np.array_equal(a[:, 34:], IMG[:, 34:]) and np.array_equal(a[34:], IMG[34:])
    assert (a[12:28, 12:28] != IMG[12:28, 12:28]).mean() > 0.9


@pytest.mark.parametrize("name", ["pix2pix", "kontext"])
def test_no_mask_edits_the_whole_frame(editors, name):
    out = editors[name](IMG, RECOLOR, None, gen(0))
    assert out.shape == IMG.shape and (out != IMG).mean() > 0.9
    assert np.array_equal(out, editors[name](IMG, RECOLOR, None, None))  # no generator = seed 0, repeatable


def test_inpaint_remove_grows_the_hole(editors):
    remove = editors["inpaint"](IMG, Step("remove", "coat", "full"), MASK, gen(0))
    recolor = editors["inpaint"](IMG, RECOLOR, MASK, gen(0))
    ring = (slice(12, 28), slice(32, 34))  # 3-4 px right of the mask: reached only through the grown hole
    assert np.array_equal(recolor[ring], IMG[ring]) and (remove[ring] != IMG[ring]).mean() > 0.5
    assert np.array_equal(remove[:, 36:], IMG[:, 36:])  # grown by 2 px, feathered by 2 more


def test_inpaint_needs_a_mask(folders):
    ed = make("inpaint", folders["inpaint"])
    with pytest.raises(EditError, match="inpaint needs a region"):
        ed(IMG, RECOLOR)
    with pytest.raises(EditError, match="empty mask"):
        ed(IMG, RECOLOR, np.zeros(IMG.shape[:2]))
    assert ed.pipe is None  # refused before loading anything


@pytest.mark.parametrize("image, mask, match", [
    (IMG.astype(np.float32), None, "uint8"), (IMG[..., 0], None, r"\(H, W, 3\)"), (IMG[:0], None, "uint8"),
    (IMG, MASK[:20], "mask has shape"), (IMG, MASK * 255, "values must lie in")])
def test_bad_input(folders, image, mask, match):
    ed = make("pix2pix", folders["pix2pix"])
    with pytest.raises(EditError, match=match):
        ed(image, RECOLOR, mask)
    assert ed.pipe is None


@pytest.mark.parametrize("model", ["imageedit-r1-tests/no-such-model", "/nonexistent/pix2pix-folder"])
def test_missing_model_says_how_to_get_it(model):
    ed = diffusion.Pix2Pix(model)
    with pytest.raises(diffusion.MissingModel) as e:
        ed(IMG, RECOLOR)
    assert f"cannot load {model!r}" in str(e.value) and f"huggingface-cli download {model}" in str(e.value)
    assert "model=" in str(e.value)


def test_loaded_lazily_and_once(folders, monkeypatch):
    import diffusers
    cls, calls = diffusers.StableDiffusionInstructPix2PixPipeline, []
    original = cls.from_pretrained
    monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: calls.append(a) or original(*a, **k))
    ed = make("pix2pix", folders["pix2pix"])
    assert ed.pipe is None and calls == []
    ed(IMG, RECOLOR, MASK, gen(0))
    pipe = ed.pipe
    ed(IMG, RECOLOR, None, gen(0))
    assert calls == [(str(folders["pix2pix"]),)] and ed.pipe is pipe


def test_registry_loader(folders, monkeypatch):
    import agents
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(agents.LOADERS, "pix2pix", lambda: diffusion.load_editor(
        "pix2pix", model=folders["pix2pix"], **FAST))
    try:
        ed = agents.agent("pix2pix")  # the loader loads: its time is the registry's load time
        assert isinstance(ed, diffusion.Pix2Pix) and ed.pipe is not None and ed.device == "cpu"
        assert ed.dtype == torch.float32 and agents.agent("pix2pix") is ed
        k = diffusion.load_editor("kontext", model=folders["kontext"])
        assert (k.quantize, k.dtype, k.device) == (False, torch.float32, "cpu")  # no NF4 without a GPU
    finally:
        agents.unload("pix2pix")


# ----------------------------------------------------------------------------------------------------------------
# Prompts and sizes

def test_prompts():
    assert diffusion.instruction(RECOLOR) == "make the coat scarlet"
    assert diffusion.instruction(Step("blur", "background", "strongly")) == "blur the background strongly"
    assert diffusion.instruction(Step("remove", "lamp post", "full")) == "remove the lamp post"
    assert diffusion.instruction(Step("replace background", "background", "a beach")) == \
        "replace the background with a beach"
    assert diffusion.describe(RECOLOR) == ("a scarlet coat", None)
    prompt, negative = diffusion.describe(Step("remove", "lamp post", "full"))
    assert "background" in prompt and negative == "lamp post"


def test_work_size():
    assert diffusion.work_size((40, 56), 32, 8) == (24, 32)
    assert diffusion.work_size((768, 1024), 1024, 16) == (768, 1024)
    assert diffusion.work_size((3000, 2000), 512, 8) == (512, 344)
    assert diffusion.work_size((1000, 10), 512, 8) == (512, 8)  # never a zero side


# ----------------------------------------------------------------------------------------------------------------
# NF4. diffusers 0.42 refuses bitsandbytes without a GPU ("No GPU found. A GPU is needed for quantization.") and
# would place the quantized weights on cuda:current_device; bitsandbytes 0.50 itself runs NF4 on the CPU.

def test_nf4_config():
    import diffusers
    import transformers
    cfg = diffusion.nf4(diffusion.Kontext.nf4_parts, torch.bfloat16)
    t = cfg._resolve_quant_config(is_diffusers=True, module_name="transformer")
    assert isinstance(t, diffusers.BitsAndBytesConfig) and t.load_in_4bit and t.bnb_4bit_quant_type == "nf4"
    assert t.bnb_4bit_compute_dtype == torch.bfloat16
    t5 = cfg._resolve_quant_config(is_diffusers=False, module_name="text_encoder_2")
    assert isinstance(t5, transformers.BitsAndBytesConfig) and t5.bnb_4bit_quant_type == "nf4"
    assert cfg._resolve_quant_config(is_diffusers=True, module_name="vae") is None  # the rest stays in dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_nf4_on_cpu_is_a_clear_error(folders):
    ed = diffusion.Kontext(folders["kontext"], dtype=torch.float32, **FAST)  # quantize=True is the default
    with pytest.raises(RuntimeError, match="No GPU found.*quantize=False"):
        ed.load()


def test_nf4_kontext_runs_on_cpu_past_diffusers_gpu_check(folders, monkeypatch):
    """With diffusers' GPU-only guard lifted, the same config loads the transformer and T5 in NF4 and edits."""
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda *a, **k: None)
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "update_device_map", lambda self, m: {"": "cpu"})
    ed = diffusion.Kontext(folders["kontext"], dtype=torch.float32, quantize=True, **FAST)
    out = ed(IMG, RECOLOR, MASK, gen(0))
    for part in (ed.pipe.transformer, ed.pipe.text_encoder_2):
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in part.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in ed.pipe.vae.modules())
    assert out.shape == IMG.shape and np.array_equal(out, ed(IMG, RECOLOR, MASK, gen(0)))
    assert np.array_equal(out[:, 34:], IMG[:, 34:]) and (out[12:28, 12:28] != IMG[12:28, 12:28]).mean() > 0.9
