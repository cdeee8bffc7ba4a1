# Two commands do all set-up on a fresh machine:
#   make lab    environment + JupyterLab on your workspace (LAB_DIR, git-ignored): your copies of
#               notebooks/ and exercises/, made once and never overwritten, so your runs never
#               modify the committed notebooks (labkit/course/workspace.py)
#   make test   environment + every test (notebooks included)
# make lab-reset NOTEBOOK=notebooks/04_load_test_concurrency.ipynb takes the course's new version
# of one notebook (make lab says when one changed); your copy is moved aside, not deleted.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Test files run side by side on this many workers (pytest-xdist, --dist loadfile: a file's tests
# stay on one worker, so a module's server starts once); 1 runs them one after another. Tests
# marked solo compare timings, so they run first, with the machine to themselves (right after
# the parallel pass, its servers and kernels still winding down, they read 30 % off).
TEST_JOBS ?= 2
LAB_PORT ?= 8888
LAB_IP   ?= 127.0.0.1
LAB_DIR  ?= workspace
STAMP  := $(VENV)/.installed
# Jupyter refuses to start as root without --allow-root (CI and many containers run as root).
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: venv lab lab-reset test gpu-test gpu-outputs lint model clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "Python 3.10+ is needed (found $$($(PYTHON) --version))."; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create $(VENV): on Debian/Ubuntu run \
	'sudo apt-get install python3-venv' and try again."; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

lab: venv
	@$(BIN)/python -m labkit.course.workspace sync --into $(LAB_DIR)
	$(BIN)/jupyter lab --notebook-dir=$(LAB_DIR) --ip=$(LAB_IP) --port=$(LAB_PORT) --no-browser $(LAB_ROOT_FLAG)

lab-reset: venv
	@test -n "$(NOTEBOOK)" || { echo "Say which: make lab-reset NOTEBOOK=notebooks/NAME.ipynb"; exit 2; }
	$(BIN)/python -m labkit.course.workspace reset --into $(LAB_DIR) $(NOTEBOOK)

test: venv
	$(BIN)/ruff check labkit tests benchmarks
	$(BIN)/ruff check --select F821 notebooks exercises  # a name no cell defines
ifeq ($(TEST_JOBS),1)
	$(BIN)/python -m pytest
else
	$(BIN)/python -m pytest -m solo
	$(BIN)/python -m pytest -m "not gpu and not solo" -n $(TEST_JOBS) --dist loadfile
endif

lint: venv
	$(BIN)/ruff check labkit tests benchmarks
	$(BIN)/ruff check --select F821 notebooks exercises

gpu-test: venv
	$(BIN)/ruff check labkit tests benchmarks
	$(BIN)/ruff check --select F821 notebooks exercises  # a name no cell defines
	$(BIN)/python -m pytest -m gpu

model: venv
	$(BIN)/labkit build-model --out model

clean:
	rm -rf $(VENV) .pytest_cache

# On a GPU machine: execute every notebook and store its outputs (what gets committed).
gpu-outputs: venv
	$(BIN)/python -m labkit.course.nbrun notebooks/*.ipynb
