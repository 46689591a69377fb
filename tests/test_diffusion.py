"""The diffusers editors on tiny random pipelines of the real classes, built offline, saved with save_pretrained and
loaded through the same from_pretrained path as the hub ids (a folder instead of an id)."""
import numpy as np
import pytest
import torch

import diffusion
from plan import Step
from diffusion import kontext_parts, sd_parts  # noqa: F401  (test_gpu24 imports sd_parts from here)
from editor import EditError

IMG = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)  # not square, not a multiple of 8
MASK = np.zeros(IMG.shape[:2], np.float32)
MASK[10:30, 10:30] = 1
RECOLOR = Step("recolor", "coat", "scarlet")
FAST = dict(steps=2, size=32)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    return {name: diffusion.tiny_folder(root / name, name) for name in ("pix2pix", "inpaint", "kontext")}


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
