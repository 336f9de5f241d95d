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

.PHONY: demo test test-all bench server deploy worker clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pillsnap demo --profile cpu-demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)  # gpu_check.py needs CUDA: `make gpu-check`
	for b in $(filter-out bench/gpu_check.py,$(wildcard bench/*.py)); do $(BIN)/python $$b || exit 1; done

server: $(STAMP)
	$(BIN)/prefect server start

PREFECT_LOCAL_API := http://127.0.0.1:4200/api

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_LOCAL_API) $(BIN)/prefect work-pool create pillsnap-process --type process \
	  --base-job-template deployments/process.json --overwrite
	PREFECT_API_URL=$(PREFECT_LOCAL_API) $(BIN)/prefect --no-prompt deploy --all

worker: $(STAMP)
	PREFECT_API_URL=$(PREFECT_LOCAL_API) $(BIN)/prefect worker start --pool pillsnap-process

# The GPU acceptance run (bench/gpu_check.py): one table, one JSON ($(GPU_OUT)); exit 3 where there is no CUDA.
# With a package registry it uses .venv like `make test`. Without one: GPU_WHEELS=<folder from `make gpu-wheels`>
# installs the project's other dependencies beside the machine's own CUDA torch (GPU_PYTHON), nothing downloaded.
GPU_PYTHON ?= python3
GPU_WHEELS ?=
GPU_OUT ?= gpu-check.json
GPU_SITE := .gpu-site
GPU_ARGS ?=
gpu-check:
ifeq ($(strip $(GPU_WHEELS)),)
	$(MAKE) $(STAMP)
	$(BIN)/python bench/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)
else
	test -f $(GPU_SITE)/.installed -a $(GPU_SITE)/.installed -nt $(GPU_WHEELS) || { rm -rf $(GPU_SITE) && \
	  $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --target $(GPU_SITE) $(GPU_WHEELS)/*.whl && \
	  touch $(GPU_SITE)/.installed; }
	PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) bench/gpu_check.py --out $(GPU_OUT) $(GPU_ARGS)
endif

# Wheels of every dependency except torch/torchvision and the CUDA libraries that come with them, for a GPU machine
# without a registry (its torch stays): the versions resolved in .venv, for GPU_PYVER on manylinux x86_64.
GPU_PYVER ?= 3.12
GPU_WHEELS_DIR ?= .gpu-wheels
TORCH_STACK := ^(torch|torchvision|triton|cuda-[a-z-]+|nvidia-(?!ml-py)[a-z0-9-]+)==
gpu-wheels: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -vP '$(TORCH_STACK)' > $(VENV)/gpu-requirements.txt
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version $(GPU_PYVER) \
	  $(foreach p,manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64) \
	  --platform any -d $(GPU_WHEELS_DIR) -r $(VENV)/gpu-requirements.txt
	@echo "$$(ls $(GPU_WHEELS_DIR)/*.whl | wc -l) wheels in $(GPU_WHEELS_DIR) ($$(du -sh $(GPU_WHEELS_DIR) | cut -f1)); on the GPU machine: make gpu-check GPU_WHEELS=$(GPU_WHEELS_DIR)"

clean:
	rm -rf exp/demo data/demo .pytest_cache
