"""The grounding agent (OWLv2 + SAM) with tiny random models built offline, saved to folders and loaded back through
the same `from_pretrained` calls as the hub ids. Random weights find nothing real, so the tests that check which box
SAM refines swap in a detection by assignment."""
import cv2
import numpy as np
import pytest
import torch

import agents
import registry
import grounding
import regions

SIDE = 96   # the working size of the tests' Grounder: the test image (120 x 200) is larger
SAM_SIDE = 64   # the tiny SAM's input size


def build(root):
    """A tiny OWLv2 (with a byte-level CLIP tokenizer) and a tiny SAM, random, saved to root/owl and root/sam."""
    from tokenizers import pre_tokenizers
    from transformers import (CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil,
                              Owlv2Processor, SamConfig, SamImageProcessorPil, SamModel, SamProcessor)
    # Every byte as a token, alone and word-final, no merges. The special tokens go last, as in CLIP's vocab: OWLv2
    # takes a query whose first id is 0 for padding and masks it out.
    vocab = {}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=len(vocab) - 2,
                eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=16)
    sam = SamConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=SAM_SIDE, patch_size=16, output_channels=16, num_pos_feats=8,
                                       global_attn_indexes=[0], window_size=2, mlp_dim=64),
                    prompt_encoder_config=dict(hidden_size=16, image_size=SAM_SIDE, patch_size=16,
                                               mask_input_channels=4),
                    mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                             iou_head_hidden_dim=16))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
                                ).save_pretrained(root / "owl")
        SamModel(sam).save_pretrained(root / "sam")
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}),
                   tokenizer=tok).save_pretrained(root / "owl")
    SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": SAM_SIDE},
                                                      pad_size={"height": SAM_SIDE, "width": SAM_SIDE})
                 ).save_pretrained(root / "sam")
    return root / "owl", root / "sam"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return build(tmp_path_factory.mktemp("grounding"))


@pytest.fixture(scope="module")
def g(folders):
    return grounding.Grounder(*folders, threshold=0.0, side=SIDE)


@pytest.fixture(autouse=True, scope="module")
def own_registry():
    """The CPU agents that fallbacks load live in a registry of their own, as in test_regions."""
    saved, registry._loaded = registry._loaded, {}
    yield
    registry._loaded = saved


def picture(h=120, w=200):
    """A red disc and a blue square on white."""
    img = np.full((h, w, 3), 255, np.uint8)
    cv2.circle(img, (w // 3, h // 2), h // 4, (220, 30, 30), -1)
    cv2.rectangle(img, (2 * w // 3, h // 4), (2 * w // 3 + h // 3, h // 4 + h // 3), (30, 30, 220), -1)
    return img


def fake_detection(g, monkeypatch, boxes, scores, objectness=None):
    """Make g.detect return these boxes (in the working copy's pixels); returns the list of queries it got."""
    queries = []

    def detect(rgb, query):
        queries.append(query)
        n = len(boxes)
        return (np.asarray(boxes, np.float32), np.asarray(scores, np.float32),
                np.asarray(objectness if objectness is not None else [0.5] * n, np.float32))

    monkeypatch.setattr(g, "detect", detect)
    return queries


def sam_boxes(g):
    """A hook that records the boxes SAM's model is called with (in its own input frame)."""
    seen = []
    handle = g.seg.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_boxes"][0].float().numpy()),
                                             with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("shape", [(120, 200), (40, 30)])
@pytest.mark.parametrize("subject", ["the red car", "cars", "sky"])
def test_find_returns_a_region_at_the_image_size(g, shape, subject):
    img = picture(*shape)
    r = g.find(img, subject)
    assert r.agent == "grounding" and r.note and "\n" not in r.note
    assert r.mask.dtype == np.float32 and r.mask.shape == shape
    assert r.mask.min() >= 0 and r.mask.max() <= 1 and r.mask.max() > 0
    assert "owl" in r.note and "sam" in r.note


def test_the_mask_is_sams_mask_of_the_best_box(g, monkeypatch):
    img = picture()
    rgb = regions.downscale(img, SIDE)
    assert rgb.shape[:2] == (58, 96)
    boxes = [[5, 5, 40, 30], [50, 10, 90, 50]]
    queries = fake_detection(g, monkeypatch, boxes, [0.3, 0.6])
    g.load()
    seen, handle = sam_boxes(g)
    try:
        r = g.find(img, "the blue car")
    finally:
        handle.remove()
    assert queries == ["a photo of a blue car"]
    # SAM got the second box (the better score), and only it, mapped into its 64 px frame
    assert len(seen) == 1 and seen[0].shape == (1, 4)
    np.testing.assert_allclose(seen[0][0], np.array(boxes[1]) * SAM_SIDE / SIDE, atol=0.5)
    expected = g.segment(rgb, [boxes[1]])[0]
    assert expected.max() > 0 and not np.array_equal(expected, g.segment(rgb, [boxes[0]])[0])
    np.testing.assert_allclose(r.mask, regions.upscale(expected, img.shape), atol=1e-6)
    assert "1 box of 'blue car'" in r.note and "(0.60)" in r.note


def test_plural_takes_the_union_of_the_boxes_left_by_nms(g, monkeypatch):
    img = picture()
    rgb = regions.downscale(img, SIDE)
    # the third overlaps the first, with a lower score; the fourth is empty (it lay in OWLv2's padding)
    boxes = [[5, 5, 40, 30], [50, 10, 90, 50], [6, 6, 40, 31], [60, 58, 96, 58]]
    fake_detection(g, monkeypatch, boxes, [0.5, 0.6, 0.4, 0.9])
    seen, handle = sam_boxes(g)
    try:
        r = g.find(img, "the cars")
    finally:
        handle.remove()
    np.testing.assert_allclose(seen[0], np.array(boxes[:2][::-1]) * SAM_SIDE / SIDE, atol=0.5)
    union = g.segment(rgb, [boxes[1], boxes[0]]).max(axis=0)
    np.testing.assert_allclose(r.mask, regions.upscale(union, img.shape), atol=1e-6)
    assert "2 boxes" in r.note


def test_background_is_one_minus_the_foreground(g, monkeypatch):
    img = picture()
    rgb = regions.downscale(img, SIDE)
    boxes = [[5, 5, 40, 30], [50, 10, 90, 50], [60, 58, 96, 58]]   # the third is empty (in OWLv2's padding)
    queries = fake_detection(g, monkeypatch, boxes, [0.9, 0.01, 0.5], objectness=[0.2, 0.7, 0.9])
    r = g.find(img, "background")   # a bare background: the most object-like box, whatever the scores
    fg = g.segment(rgb, [boxes[1]])[0]
    np.testing.assert_allclose(r.mask, regions.upscale(1 - fg, img.shape), atol=1e-6)
    assert r.agent == "grounding" and r.note.startswith("background around")
    r = g.find(img, "the background behind the dog")   # a named foreground: its best box
    assert queries[-1] == "a photo of a dog"
    np.testing.assert_allclose(r.mask, regions.upscale(1 - g.segment(rgb, [boxes[0]])[0], img.shape), atol=1e-6)


def test_nothing_above_the_threshold_falls_back(folders, monkeypatch):
    img = picture()
    g = grounding.Grounder(*folders, threshold=0.1, side=SIDE)
    fake_detection(g, monkeypatch, [[5, 5, 40, 30]], [0.05])
    r = g.find(img, "red circle")
    cpu = regions.find(img, "red circle")
    assert "found no 'red circle' above 0.10" in r.note and "fell back" in r.note and "owl" in r.note
    assert r.agent == cpu.agent == "color"
    np.testing.assert_array_equal(r.mask, cpu.mask)


@pytest.mark.parametrize("subject", ["whole image", "the photo", "left", "top half"])
def test_whole_and_frame_subjects_go_to_regions(subject):
    img = picture()
    g = grounding.Grounder(detector="/nonexistent/owl")
    r, cpu = g.find(img, subject), regions.find(img, subject)
    assert r.agent == cpu.agent and r.note == cpu.note
    np.testing.assert_array_equal(r.mask, cpu.mask)
    assert g.det is None and g.error is None   # no model was even tried


@pytest.mark.parametrize("which", ["detector", "segmenter"])
@pytest.mark.parametrize("missing", ["folder", "hub id"])
def test_a_missing_model_falls_back_and_says_so(folders, tmp_path, which, missing, monkeypatch):
    name = str(tmp_path / "no-such-model") if missing == "folder" else "nobody/no-such-model"
    kw = dict(zip(["detector", "segmenter"], folders)) | {which: name}
    g = grounding.Grounder(**kw, side=SIDE)
    img = picture()
    r = g.find(img, "red circle")
    assert "fell back" in r.note and name in r.note
    np.testing.assert_array_equal(r.mask, regions.find(img, "red circle").mask)
    # the failure is remembered: the next call falls back without trying the hub again
    from transformers import Owlv2Processor
    monkeypatch.setattr(Owlv2Processor, "from_pretrained", lambda *a, **k: pytest.fail("loaded twice"))
    assert "fell back" in g.find(img, "blue square").note


def test_strict_raises_with_how_to_get_the_model(tmp_path):
    with pytest.raises(RuntimeError, match=r"nobody/no-such-owl.*huggingface-cli download nobody/no-such-owl"):
        grounding.Grounder(detector="nobody/no-such-owl", strict=True).find(picture(), "the red car")
    err = grounding.missing_model_error("facebook/sam-vit-base", OSError("no connection"))
    assert "facebook/sam-vit-base" in str(err) and "local folder" in str(err)
    assert "pip install transformers" in str(grounding.missing_model_error("x", ImportError("no transformers")))


@pytest.mark.parametrize("bad", [np.zeros((20, 30, 3), np.float32), np.zeros((20, 30, 4), np.uint8),
                                 np.zeros((20, 30), np.uint8), [[0, 0, 0]]])
def test_bad_images_are_a_clear_error(folders, bad):
    g = grounding.Grounder(*folders)
    with pytest.raises(ValueError, match=r"uint8 RGB|numpy array"):
        g.find(bad, "the red car")
    assert g.det is None   # checked before any model is loaded


def test_models_load_lazily_and_once(folders, monkeypatch):
    from transformers import Owlv2ForObjectDetection, SamModel
    calls = []
    for cls in (Owlv2ForObjectDetection, SamModel):
        orig = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _o=orig, **k: calls.append(a[0]) or _o(*a, **k))
    g = grounding.Grounder(*folders, threshold=0.0, side=SIDE)
    assert calls == [] and g.det is None
    g.find(picture(), "the red car")
    g.find(picture(), "the blue square")
    assert calls == [str(folders[0]), str(folders[1])]


def test_dtype_is_passed_down(folders):
    g = grounding.Grounder(*folders, dtype=torch.bfloat16, threshold=0.0, side=SIDE)
    r = g.find(picture(), "the red car")
    assert g.det.dtype == g.seg.dtype == torch.bfloat16
    assert r.mask.dtype == np.float32 and r.agent == "grounding"


def test_the_registry_loader_builds_an_unloaded_grounder(capsys):
    g = grounding.load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"device {device}" in capsys.readouterr().out
    assert (g.device, g.dtype, g.strict) == (device, torch.float16 if device == "cuda" else torch.float32, False)
    assert (g.detector, g.segmenter) == (grounding.DETECTOR, grounding.SEGMENTER) and g.det is None


def test_detect_reads_boxes_as_fractions_of_the_padded_square(g):
    """OWLv2 pads to a square before resizing: a box is a fraction of the longer side, clipped to the image."""
    g.load()
    cxcywh = torch.tensor([[0.5, 0.25, 0.2, 0.1], [0.9, 0.9, 0.4, 0.4]])

    def forced(module, args, kwargs, out):
        out.pred_boxes = torch.zeros_like(out.pred_boxes)
        out.pred_boxes[0, :2] = cxcywh
        return out

    handle = g.det.register_forward_hook(forced, with_kwargs=True)
    try:
        boxes, scores, objectness = g.detect(regions.downscale(picture(), SIDE), "a photo of a car")   # 58 x 96
    finally:
        handle.remove()
    np.testing.assert_allclose(boxes[:2], [[38.4, 19.2, 57.6, 28.8], [67.2, 58, 96, 58]], atol=1e-4)
    assert boxes.shape == (16, 4) and scores.shape == objectness.shape == (16,)
    assert 0 <= scores.min() and scores.max() <= 1
