# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both set up what they need, idempotently: Debian packages, .venv/, torch first, then the project.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
APT_PACKAGES := tuxpaint-stamps-default
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DVC_NO_ANALYTICS := 1
# DVC stages call `mdsgen`: the venv's bin comes first on PATH
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first: the CPU wheel on disk; a GPU user who installed their own torch keeps it
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,pipeline]"
	touch $(STAMP)

demo: setup
	mdsgen models
	mdsgen params use demo
	dvc repro
	mdsgen init-checkpoint runs/demo/untrained --vae models/vae
	mdsgen generate data/dataset/metadata.csv --split test --limit 4 -o runs/demo/generated \
		--checkpoint runs/demo/untrained
	mdsgen generate "$$(python -c 'import mdsgen.samples as s; print(s.bigbuckbunny())')" \
		-o runs/demo/generated --checkpoint runs/demo/untrained

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
