# Two commands do all the set-up: `make quickstart` (the main job) and `make test`.
# Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 1

.PHONY: quickstart test notebooks docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/timsim sweep configs/sweeps/quickstart.yaml

# Four workers on two cores: a worker's Python (tracing, pandas, subprocess start-up) overlaps
# another's XLA compile, and beside a busy neighbour the suite keeps a fair share of the CPU.
TEST_WORKERS ?= 4
# Two sessions: most tests compile with XLA's older CPU fusion emitter (half the compile time);
# the `bits` tests, which assert bit equality between two computations, run with the production
# emitter, whose code for an op does not depend on the fusion it lands in (tests/conftest.py).
test: $(STAMP)
	TIMSIM_TEST_FAST_EMITTER=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=25 -m "not bits" tests
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=10 -m bits tests

# Every notebook, executed with a real kernel at full size (TIMSIM_NOTEBOOK_TOY=1 for toy size, as CI does).
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py $(if $(TIMSIM_NOTEBOOK_TOY),--toy)

# The documentation site into site/ (strict: a broken link or reference fails).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# timsim's step against a hand-written PyTorch step, A B A B; installs torch (the bench extra) on first use.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/timsim bench

clean:
	rm -rf $(VENV) .jax_cache runs site
