# diffusion_np: every target sets itself up; `make test` is what CI checks.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
# A CPU wheel of this exact version is what the cross-checks are pinned to.
TORCH  := torch==2.13.0

.PHONY: help install test test-gpu crosscheck demo demo-train bench fixtures lint clean docs site lab

help:
	@echo "make test        ruff + the test suite (sets up .venv on first use)"
	@echo "make crosscheck  parity tests against live torch/diffusers"
	@echo "make demo        the main demo on built-in data (about a minute)"
	@echo "make lab         JupyterLab on tutorials/ at http://127.0.0.1:$(LAB_PORT)/lab (sets up the notebooks extra)"
	@echo "make demo-train  retrain the shipped models (PRESET=full, ~1.5 h; PRESET=demo, ~30 min), evaluate them"
	@echo "make bench       NumPy vs PyTorch CPU benchmark ratios"
	@echo "make site        build the documentation site, tutorials executed, into site/ (no server)"
	@echo "make docs        make site, then serve it on 127.0.0.1:8000"
	@echo "make fixtures    regenerate the golden torch/diffusers fixtures"
	@echo "make test-gpu    the CuPy tests (needs a CUDA GPU and the gpu extra)"

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev]"
	touch $@

$(VENV)/.installed-crosscheck: $(VENV)/.installed-dev
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev,crosscheck]"
	touch $@

$(VENV)/.installed-notebooks: $(VENV)/.installed-dev
	$(PIP) install -e ".[dev,notebooks]"
	touch $@

install: $(VENV)/.installed-dev

lint: install
	$(VENV)/bin/ruff check .

# Notebooks run in their QUICK mode (tutorials/README.md); GPU tests skip without a device.
# Each notebook runs once: tests/docs builds the site with `mkdocs build --strict`, which executes the
# tutorials (docs/_gen/hooks.py; cached in .cache/ by content, an error fails the build) and renders them
# in headless Chromium when installed; nbmake runs the solutions.
# pytest-xdist runs one worker per core; --dist loadfile keeps a file's tests (and its module fixtures,
# such as the built site) in one worker, and one BLAS thread per worker avoids oversubscribing the cores.
test: install lint
	DIFFUSION_NP_QUICK=1 NO_MKDOCS_2_WARNING=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
	  $(PY) -m pytest -m "not crosscheck" -q -n auto --dist loadfile --nbmake --nbmake-timeout=300 tests tutorials/solutions

crosscheck: $(VENV)/.installed-crosscheck
	$(PY) -m pytest -m crosscheck -q

test-gpu: install
	$(PIP) install -e ".[dev,gpu]"
	$(PY) -m pytest -m gpu -q

fixtures: $(VENV)/.installed-crosscheck
	cd tests && ../$(PY) fixtures/make_fixtures.py

# The site works offline and from file:// (site/index.html); serve binds to localhost only.
# The build executes every tutorial (full mode where tutorials/README.md gives a full run under
# 5 minutes, quick otherwise; the first build takes about 15 minutes, later ones reuse .cache/).
site: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs: site
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:8000

# JupyterLab on the tutorials, on this machine only; it prints the URL (with its token) when ready.
LAB_PORT ?= 8888
lab: $(VENV)/.installed-notebooks
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --ServerApp.root_dir=tutorials \
		$(if $(filter 0,$(shell id -u)),--allow-root)

demo: install
	$(PY) -m diffusion_np demo --out demo

# The shipped weights (diffusion_np/pretrained/) from scratch, with the commands of their model
# cards: the digits model; the shapes VAE, then the U-Net + text encoder on its latents; each
# exported (EMA weights, float16) to runs/pretrained/ and evaluated. PRESET=full (the default)
# is what was shipped, about 1.5 hours on 2 cores; PRESET=demo takes about 10 minutes a model.
PRESET ?= full
demo-train: install
	$(PY) -m diffusion_np train digits --preset $(PRESET) --out runs/digits
	$(PY) -m diffusion_np train shapes-vae --preset $(PRESET) --out runs/shapes-vae
	$(PY) -m diffusion_np train shapes --preset $(PRESET) --vae runs/shapes-vae --min-snr-gamma 5 --out runs/shapes
	$(PY) -m diffusion_np export --checkpoint runs/digits --out runs/pretrained/digits
	$(PY) -m diffusion_np export --checkpoint runs/shapes --out runs/pretrained/shapes
	$(PY) -m diffusion_np train shapes-controlnet --preset $(PRESET) --base runs/pretrained/shapes --out runs/shapes-controlnet
	$(PY) -m diffusion_np export --checkpoint runs/shapes-controlnet --out runs/pretrained/shapes-controlnet
	$(PY) -m diffusion_np evaluate --checkpoint runs/pretrained/digits --guidance-scale 3 --json runs/digits.json
	$(PY) -m diffusion_np evaluate --checkpoint runs/pretrained/shapes --guidance-scale 4 --json runs/shapes.json
	$(PY) -m diffusion_np evaluate --checkpoint runs/pretrained/shapes-controlnet --json runs/shapes-controlnet.json
	$(PY) -m diffusion_np sample --checkpoint runs/pretrained/shapes --steps 50 -n 4 -o runs/shapes/prompts.png \
		--prompt "a large red circle in the center" --prompt "a small blue square in the top left" \
		--prompt "a large green triangle in the center"

bench: $(VENV)/.installed-crosscheck
	$(PY) -m benchmarks.ops --json bench-ops.json
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m benchmarks.ops --json bench-ops-unset.json
	$(PY) -m benchmarks.train --json bench-train.json && env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m benchmarks.train --json bench-train.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site .cache
