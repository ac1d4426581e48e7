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

# Two sessions at once, five workers on two cores: a worker's Python (tracing, pandas, subprocess
# start-up) overlaps another's XLA compile, and beside a busy neighbour the suite keeps a fair
# share of the CPU. Most tests compile with XLA's older CPU fusion emitter (half the compile
# time); the `bits` tests, which assert bit equality between two computations, run with the
# production emitter, whose code for an op does not depend on the fusion it lands in
# (tests/conftest.py). Run side by side, neither session idles in the other's tail; the bits
# session's report follows the main one's, and either failing (or collecting nothing: pytest's
# exit 5) fails `make test`.
TEST_WORKERS ?= 3
BITS_WORKERS ?= 2
test: $(STAMP)
	@$(BIN)/python -m pytest -n $(BITS_WORKERS) --durations=10 -m bits tests > .test-bits.log 2>&1 & bits=$$!; \
	trap 'kill $$bits 2>/dev/null' INT TERM; \
	TIMSIM_TEST_FAST_EMITTER=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=25 -m "not bits" tests; main=$$?; \
	wait $$bits; bits_status=$$?; \
	echo "==== the bits session (production XLA emitter): exit $$bits_status ===="; cat .test-bits.log; \
	echo "main session: exit $$main; bits session: exit $$bits_status"; \
	[ $$main -eq 0 ] && [ $$bits_status -eq 0 ]

# Every notebook, executed with a real kernel at full size (TIMSIM_NOTEBOOK_TOY=1 for toy size, as CI does).
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py $(if $(TIMSIM_NOTEBOOK_TOY),--toy)

# The documentation site into site/ (strict: a broken link or reference fails).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# timsim's step against a hand-written PyTorch step, A B A B, then the quickstart study's wall time with
# nothing compiled yet (~3 min more); installs torch (the bench extra) on first use.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/timsim bench --study configs/sweeps/quickstart.yaml

clean:
	rm -rf $(VENV) .jax_cache runs site .test-bits.log
