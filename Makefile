# Two commands for a fresh machine: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export YOLO_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-all bench server deploy worker clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pillsnap demo --profile cpu-demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

server: $(STAMP)
	$(BIN)/prefect server start

PREFECT_LOCAL_API := http://127.0.0.1:4200/api

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_LOCAL_API) $(BIN)/prefect work-pool create pillsnap-process --type process \
	  --base-job-template deployments/process.json --overwrite
	PREFECT_API_URL=$(PREFECT_LOCAL_API) $(BIN)/prefect --no-prompt deploy --all

worker: $(STAMP)
	PREFECT_API_URL=$(PREFECT_LOCAL_API) $(BIN)/prefect worker start --pool pillsnap-process

clean:
	rm -rf exp/demo data/demo .pytest_cache
