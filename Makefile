# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both set up what they need, idempotently: Debian packages, .venv/, torch first, then the project.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
AISFX  := aisfx==0.1.2
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
	$(PY) -m pip install -q -e ".[test,pipeline,kubeflow,serving]"
	# aisfx ships the evaluation's pretrained sound network; its pins (librosa 0.9, numpy 1.23) are stale
	$(PY) -m pip install -q --no-deps "$(AISFX)"
	touch $(STAMP)

demo: setup
	mdsgen models
	mdsgen params use demo
	dvc repro
	mdsgen generate data/dataset/metadata.csv --split test --limit 4 -o outputs/demo/generated \
		--model models:/mdsgen@champion
	mdsgen generate "$$(python -c 'import mdsgen.samples as s; print(s.bigbuckbunny())')" \
		-o outputs/demo/generated --model models:/mdsgen@champion
	@echo
	@cat reports/eval/table.md
	@echo "Evaluation: reports/eval/ (table.md, metrics.png, mels.png, WAVs); generated: outputs/demo/generated/"
	@echo "MLflow UI:  mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db  (then open http://127.0.0.1:5000)"

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf runs outputs .pytest_cache
