# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both set up what they need, idempotently: Debian packages, .venv/, torch first, then the project.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
AISFX  := aisfx==0.1.2
# tuxpaint-stamps-default: the embedded dataset; chromium and its driver: the web page's browser test
APT_PACKAGES := tuxpaint-stamps-default chromium chromium-driver
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DVC_NO_ANALYTICS := 1
# DVC stages call `mdsgen`: the venv's bin comes first on PATH
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# make test runs on two pytest-xdist workers (the fast tier: 288 s against 223 s serial here, so it stays serial);
# the ci pipeline's tests stay on one worker (tests/conftest.py).
# TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup demo demo-serve test test-fast clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first: the CPU wheel on disk; a GPU user who installed their own torch keeps it
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,pipeline,kubeflow,serving,monitoring,app]"
	# aisfx ships the evaluation's pretrained sound network; its pins (librosa 0.9, numpy 1.23) are stale
	$(PY) -m pip install -q --no-deps "$(AISFX)"
	touch $(STAMP)

# The whole main job: train and register on the demo profile, serve the champion on Triton, generate
# through the gRPC client for the held-out clips and a real video, stop the server.
DEMO := outputs/demo
demo: setup
	mdsgen models
	mdsgen params use demo
	dvc repro
	$(MAKE) --no-print-directory demo-serve

# The serving half alone, on whatever champion the registry holds.
demo-serve: setup
	-mdsgen serve --stop
	@# the champion; when the gate has never promoted one, the challenger, said out loud (the gate is not moved)
	model=$$(python -c 'import json; d = json.load(open("reports/promotion.json")); \
	print("models:/%s@%s" % (d["name"], "champion" if d["champion"] else "challenger"))'); \
	case "$$model" in *challenger) echo "No champion: the gate refused this model (reports/promotion.json); serving the challenger for the demo.";; esac; \
	mdsgen serve --ports 0 0 0 --model "$$model"
	status=0; \
	mdsgen client data/dataset/metadata.csv --split test --limit 8 -o $(DEMO)/heldout || status=1; \
	mdsgen client "$$(python -c 'import mdsgen.base.samples as s; print(s.bigbuckbunny())')" -o $(DEMO)/bigbuckbunny || status=1; \
	mdsgen serve --stop; exit $$status
	mdsgen compare-mels $(DEMO)/heldout data/dataset/clips -o $(DEMO)/mels-generated-vs-real.png
	cp reports/eval/table.md $(DEMO)/evaluation.md
	@echo
	@cat $(DEMO)/evaluation.md
	@echo "Results:    $(DEMO)/ (heldout/ and bigbuckbunny/: WAV + muxed MP4; mels-generated-vs-real.png; evaluation.md)"
	@echo "Evaluation: reports/eval/ (metrics.json, metrics.png, mels.png, WAVs of every system)"
	@model=$$(python -c 'import json; d = json.load(open("reports/promotion.json")); \
	print("models:/%s@%s" % (d["name"], "champion" if d["champion"] else "challenger"))'); \
	echo "Try it:     mdsgen app --model $$model   (then open http://127.0.0.1:7860)"
	@store="$$(python -c 'from mdsgen.config import load_params as l; from mdsgen.evaluation.tracking import tracking_uri as t; print(t(l().mlflow.tracking_uri))')"; \
	case "$$store" in http*) echo "MLflow UI:  $$store";; \
	*) echo "MLflow UI:  mlflow ui --backend-store-uri $$store  (then open http://127.0.0.1:5000)";; esac

test: setup
	$(PY) -m pytest -q $(XDIST)

# The unit tier, for the inner loop: no pipeline run, no servers, no training to a bar
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs outputs .pytest_cache
