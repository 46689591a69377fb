"""
The open-vocabulary region agent of the gpu24 preset: a subject in words -> boxes (OWLv2) -> a mask (SAM).

    g = grounding.Grounder(device="cuda", dtype=torch.float16)  # nothing is loaded yet
    r = g.find(image, "the red car")   # Region(mask=float32 HxW in [0, 1], agent="grounding", note="...")
    grounding.Grounder(detector="/models/owlv2", segmenter="/models/sam")   # local folders instead of hub ids
    grounding.Grounder(strict=True)    # a model that cannot be loaded is an error, not a fallback
    agents.LOADERS["grounding"] = grounding.load                 # the registry's loader (device chosen there)

Defaults: google/owlv2-base-patch16-ensemble (detector) and facebook/sam-vit-base (segmenter), each loaded with
`from_pretrained` (a hub id or a saved folder) on the first `find`, once.

Why OWLv2 and not GroundingDINO: OWLv2 is a plain ViT with linear box, class and objectness heads, so it runs the
same on a CPU and a GPU (GroundingDINO's multi-scale deformable attention has a CUDA kernel and a slow fallback);
its processor has a PIL backend (torchvision cannot be installed here); its CLIP tokenizer is easy to build offline
for tests; and its objectness head gives the main subject behind "background" without a second query.

How a subject is routed (regions.py's words):
    whole   "whole image", "photo", ""             regions.find: a mask of ones
    frame   "left", "top half", "center"           regions.find: exact halves, no model can do better
    backdrop  "background", "backdrop", "behind"   1 - the SAM mask of what else is named ("the background behind
                                                   the dog" -> "dog"), else of OWLv2's most object-like box
    anything else ("the red car", "sky", "her coat", "cars")   OWLv2 boxes above `threshold` -> SAM -> union
A singular subject takes the best box; a plural ("the cars") every box after non-maximum suppression.

Falls back to regions.find (the CPU agents), and says so in the note, when a model cannot be loaded (no network and
not in the cache, a wrong folder, transformers missing), when OWLv2 finds nothing above the threshold, and when SAM
keeps nothing. `strict=True` raises `missing_model_error` instead of the first of these.

Simplified: one text query per subject (no prompt ensembling or query of the attributes apart); a box is refined by
one SAM mask (multimask_output=False), not the best of three; no mask refinement between SAM passes; the models see
a copy of at most `side` px (default 1024, SAM's input size), masks come back at the image's own size.
"""
from pathlib import Path

import numpy as np
import torch

import regions

DETECTOR = "google/owlv2-base-patch16-ensemble"
SEGMENTER = "facebook/sam-vit-base"
# Backdrop words: "sky" and "wall" are things OWLv2 can box, so they are queried like any other subject.
BACKDROP = regions.BACKGROUND - {"sky", "wall"}
STOP = regions.DETERMINERS | regions.FILLER | {"around", "of", "in", "and", "with", "from"}


def missing_model_error(name, exc):
    """The error for a model that could not be loaded: what failed and how to get it."""
    if isinstance(exc, ImportError):
        return RuntimeError(f"the grounding agent needs transformers and pillow: pip install transformers pillow "
                            f"({exc})")
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]  # its first sentence
    return RuntimeError(
        f"cannot load {name} ({type(exc).__name__}: {first}). It is not a model folder and not in the Hugging Face "
        f"cache: on a machine with network run `huggingface-cli download {name}` (or unset HF_HUB_OFFLINE), or pass "
        f"a local folder that holds it (Grounder(detector=..., segmenter=...))")


class Grounder:
    """OWLv2 + SAM behind regions.find's interface. Models are loaded on the first `find`, in `dtype` on `device`."""

    def __init__(self, detector=DETECTOR, segmenter=SEGMENTER, device="cpu", dtype=torch.float32, threshold=0.1,
                 nms=0.5, max_boxes=10, side=1024, strict=False):
        self.detector, self.segmenter = str(detector), str(segmenter)
        self.device, self.dtype, self.strict = device, dtype, strict
        self.threshold = threshold  # OWLv2's scores are low (0.1-0.4 for a clear object): its model card uses 0.1
        self.nms, self.max_boxes, self.side = nms, max_boxes, side
        self.det_proc = self.det = self.seg_proc = self.seg = None
        self.error = None  # why the models could not be loaded: kept, so later calls fall back without retrying

    def load(self):
        """Load both models, once. Returns True when they are there."""
        if self.det is not None or self.error is not None:
            return self.det is not None
        name = "transformers"
        try:
            from transformers import Owlv2ForObjectDetection, Owlv2Processor, SamModel, SamProcessor
            # backend="pil": the image processors' torchvision backend is not installed here; asking for PIL gives
            # the same preprocessing on every machine and no warning about the fallback.
            name = self.detector
            det_proc = Owlv2Processor.from_pretrained(name, backend="pil")
            det = Owlv2ForObjectDetection.from_pretrained(name, dtype=self.dtype).to(self.device).eval()
            name = self.segmenter
            seg_proc = SamProcessor.from_pretrained(name, backend="pil")
            seg = SamModel.from_pretrained(name, dtype=self.dtype).to(self.device).eval()
        except (ImportError, OSError, ValueError) as e:  # ValueError: a path that is no folder is no valid hub id
            if self.strict:
                raise missing_model_error(name, e) from e
            self.error = f"{name} not loaded ({type(e).__name__})"
            return False
        self.det_proc, self.det, self.seg_proc, self.seg = det_proc, det, seg_proc, seg
        return True

    @torch.no_grad()
    def detect(self, rgb, query):
        """Every OWLv2 box for `query` on `rgb`: (boxes (N, 4) x0 y0 x1 y1 in rgb's pixels, scores (N,), objectness
        (N,)), float32 numpy, one per patch of OWLv2's grid (3600 at 960 px)."""
        from PIL import Image
        inputs = self.det_proc(text=[[query]], images=Image.fromarray(rgb), return_tensors="pt", truncation=True)
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        out = self.det(**inputs)
        h, w = rgb.shape[:2]
        # OWLv2's processor pads the image to a square (bottom and right) before resizing, so boxes are fractions
        # of that square's side, not of the width and height.
        cx, cy, bw, bh = out.pred_boxes[0].float().cpu().unbind(-1)  # (N,) each
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * max(h, w)
        boxes = boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h], dtype=torch.float32))
        scores = out.logits[0, :, 0].float().sigmoid().cpu()  # (N,): one text query
        objectness = out.objectness_logits[0].float().sigmoid().cpu()  # (N,)
        return boxes.numpy(), scores.numpy(), objectness.numpy()

    @torch.no_grad()
    def segment(self, rgb, boxes):
        """SAM's mask of each box (x0 y0 x1 y1 in rgb's pixels): (N, h, w) float32 in {0, 1}. One image embedding
        for all boxes."""
        from PIL import Image
        boxes = [[float(v) for v in b] for b in boxes]
        inputs = self.seg_proc(images=Image.fromarray(rgb), input_boxes=[boxes], return_tensors="pt")
        # the processor maps the boxes into SAM's 1024 px frame; they come back float64, which a half model refuses
        out = self.seg(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                       input_boxes=inputs["input_boxes"].to(self.device, self.dtype), multimask_output=False)
        masks = self.seg_proc.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                 inputs["reshaped_input_sizes"])[0]  # (N, 1, h, w) bool
        return masks[:, 0].numpy().astype(np.float32)

    def pick(self, scores, boxes, plural):
        """Indices of the boxes kept, best first: above the threshold and not empty, then greedy non-maximum
        suppression (a box that overlaps a better one by IoU > nms is the same object); one unless plural."""
        area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)  # (N,); 0 for a box that lies in OWLv2's padding
        order, keep = np.flatnonzero((scores >= self.threshold) & (area > 0)), []
        order = order[np.argsort(-scores[order], kind="stable")]
        while len(order) and len(keep) < (self.max_boxes if plural else 1):
            i, order = order[0], order[1:]
            keep.append(i)
            inter = np.prod(np.clip(np.minimum(boxes[i, 2:], boxes[order, 2:])
                                    - np.maximum(boxes[i, :2], boxes[order, :2]), 0, None), axis=1)
            order = order[inter <= self.nms * (area[i] + area[order] - inter)]  # IoU <= nms, without dividing by 0
        return np.array(keep, int)

    def find(self, image, subject):
        """The Region of `subject` on `image` (uint8 RGB, H x W x 3), at the image's own size."""
        regions._check(image)
        words = regions._words(subject)
        name = " ".join(words)
        if name in regions.WHOLE or regions.agent_for(subject) == "frame":
            return regions.find(image, subject)  # no model needed, and none would be more exact

        def fallback(why):
            r = regions.find(image, subject)
            return regions.Region(r.mask, r.agent, f"{why}: fell back to the CPU agents: {r.note}")

        if not self.load():
            return fallback(self.error)
        rgb, owl, sam = regions.downscale(image, self.side), Path(self.detector).name, Path(self.segmenter).name
        backdrop = any(w in BACKDROP for w in words)
        named = [w for w in words if w not in BACKDROP and w not in STOP] if backdrop else words
        if named:  # OWL's training captions read "a photo of a cat": the query is put the same way
            plural = named[-1] != regions._singular(named[-1])
            thing = " ".join(named)
            boxes, scores, _ = self.detect(rgb, f"a photo of {'' if plural else 'a '}{thing}")
            kept = self.pick(scores, boxes, plural)
            if len(kept) == 0:
                return fallback(f"{owl} found no '{thing}' above {self.threshold:.2f} (best {scores.max():.2f})")
            how = f"{len(kept)} box{'es' * (len(kept) > 1)} of '{thing}' by {owl} ({scores[kept[0]]:.2f})"
        else:  # a bare "background": the foreground is OWLv2's most object-like box, whatever the query
            boxes, _, objectness = self.detect(rgb, "a photo of an object")
            empty = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) <= 0  # boxes that lay in OWLv2's padding
            kept = np.argsort(-np.where(empty, -1, objectness), kind="stable")[:1]
            how = f"the most object-like box by {owl} ({objectness[kept[0]]:.2f})"
        mask = self.segment(rgb, boxes[kept]).max(axis=0)  # (h, w): the union of the boxes' masks
        if mask.max() == 0:
            return fallback(f"{sam} kept nothing of {how}")
        if backdrop:
            mask, how = 1 - mask, f"background around {how}"
        mask = regions.upscale(mask, image.shape)
        return regions.Region(mask, "grounding", f"{how} -> {sam}: {regions._pct(mask)} of the image")


def load(device=None, dtype=None, strict=False):
    """The registry's loader (agents.LOADERS["grounding"] = grounding.load): a Grounder with the default models, on
    the GPU in float16 when there is one, else on the CPU in float32. Nothing is read until the first `find`."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"grounding: device {device}" + ("" if device == "cuda" else " (no CUDA GPU)"))
    if dtype is None:  # half precision halves memory and time on a GPU; a CPU computes it slowly, if at all
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    return Grounder(device=device, dtype=dtype, strict=strict)
