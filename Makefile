# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ldmkit run configs/digits.yaml

# two workers of one thread each: the tests' tiny models gain little from a second thread, and
# two processes of two threads each on 2 cores spin (OpenMP); see README, "Tests"
TEST_ENV := OMP_NUM_THREADS=1
TEST_ARGS := -n 2 --dist loadgroup --durations=15

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(TEST_ENV) $(BIN)/pytest -q $(TEST_ARGS)

# the edit-test loop: everything not marked slow (under 3 minutes)
test-quick: $(STAMP)
	$(TEST_ENV) $(BIN)/pytest -q $(TEST_ARGS) -m "not slow"

# in this order: recipe chooses configs/mnist.yaml's recipe, which time_to_quality then
# trains, and sampler_quality samples the MNIST model that time_to_quality trains
bench: $(STAMP)
	for script in throughput scaleout recipe time_to_quality sampler_quality objectives conditional text \
			fastpath compile_bisect fastpath_quality loop_overhead dit_profile forecast probe; do \
		$(BIN)/python benchmarks/$$script.py || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
