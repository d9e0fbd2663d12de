# Two commands for a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch and torchvision are pinned to releases known to install together on Python 3.11.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
HOST   ?= 127.0.0.1
PORT   ?= 7860
WEB_PORT ?= 8000

.PHONY: demo demo-model web web-runtime test lint bench install browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The browser test drives Debian's chromium; installed here when we may (root with apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed and cannot be installed here: the browser test will be skipped"; fi; }

# onnxruntime-web for the static page: pinned, integrity-checked, downloaded once into the user cache.
web-runtime: install
	@$(BIN)/python -m export web-runtime || echo "onnxruntime-web could not be fetched: the web page's browser tests will be skipped"

# The static page for the bundled model, served on http://127.0.0.1:8000 (an option, not a set-up step).
web: install
	rm -rf build/web
	$(BIN)/python -m export web assets/model.onnx --out build/web --examples 12 --examples-from assets/examples --title "ViT shapes classifier"
	$(BIN)/python -m export serve build/web --host $(HOST) --port $(WEB_PORT)

# The app on the bundled model: checks the model file, then serves http://127.0.0.1:7860
demo: install
	$(BIN)/python -c "from vit.runtime import Classifier; c = Classifier('assets/model.onnx'); \
	print(f'model ok: {len(c.labels)} classes, validation accuracy {float(c.metadata[\"val_accuracy\"]):.1%}')"
	$(BIN)/python app.py --host $(HOST) --port $(PORT)

# Regenerate the bundled demo model from scratch: data (with a held-out test/ folder), training, export, accuracy.
# --no-mirror-average, --stem-depth 1: the bundled file predicts from the image alone, with the stem it was made
# with (the README's numbers).
demo-model: install
	rm -rf runs/demo-data runs/demo
	$(BIN)/python -m vit.datasets shapes --out runs/demo-data/train --per-class 1200 --size 64 --seed 0
	$(BIN)/python -m vit.datasets shapes --out runs/demo-data/test --per-class 100 --size 64 --seed 1
	$(BIN)/python train.py --data runs/demo-data --out runs/demo --seed 0 --workers 1 --image-size 48 --patch-size 8 \
	  --dim 128 --depth 6 --heads 4 --mlp-dim 256 --batch-size 64 --val-fraction 0.1 --time-budget 11 --epochs 60 \
	  --no-mirror-average --stem-depth 1
	$(BIN)/python -m export runs/demo --out assets/model.onnx --canvas
	$(BIN)/python benchmarks/demo_accuracy.py --model assets/model.onnx

test: install browser web-runtime
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m vit.bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info artifacts
