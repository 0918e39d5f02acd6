PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow lint bench train-embedded clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

# k-diffusion is the test reference for samplers diffusers lacks; its declared dependencies pull torchvision, so it
# and what its sampling module needs are installed without them (tests/sampling_ref.py loads only that module).
KDIFFUSION := k-diffusion==0.1.1.post1 torchsde==0.2.6 torchdiffeq==0.2.5 trampoline==0.1.2

$(TEST_STAMP): $(STAMP) Makefile
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(KDIFFUSION)
	touch $@

demo: $(STAMP)
	$(BIN)/nijimi demo --out out

test: $(TEST_STAMP) chromium
	$(BIN)/python -m pytest -q

# The browser tests (tests/browser/) drive the system's Chromium through Playwright, whose own browser download needs
# the network: install Debian's chromium when there is none (as root; otherwise those tests say what is missing).
chromium:
	@if [ -z "$$NIJIMI_CHROMIUM" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: no Chromium: the browser tests will fail (apt-get install chromium, or set NIJIMI_CHROMIUM)" >&2; \
	  fi; \
	fi

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(TEST_STAMP)
	$(BIN)/ruff check nijimi tests bench

bench: $(TEST_STAMP)
	$(BIN)/python bench/unet.py

train-embedded: $(STAMP)
	$(BIN)/pip install -q -e '.[plots]'
	$(BIN)/nijimi train --config configs/embedded.toml --resume
	$(BIN)/nijimi train --config configs/embedded-captions.toml --resume
	$(BIN)/nijimi train --config configs/embedded-captions.toml --resume --out runs/embedded-captions-2 \
		--init runs/embedded-captions/model.safetensors --export runs/embedded-captions-2/model.safetensors \
		--seed 2 --unet.lr 1.5e-4
	$(BIN)/nijimi train --config configs/embedded-captions.toml --resume --overwrite --out runs/embedded-captions-3 \
		--init runs/embedded-captions-2/model.safetensors --export nijimi/embedded/model.safetensors \
		--seed 3 --unet.steps 2500 --unet.lr 1e-4 --unet.ema-decay 0.999

clean:
	rm -rf $(VENV) out
