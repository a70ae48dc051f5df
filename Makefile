# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests read datasets from here; CI sets it too.
FEDHEALTH_DATA_DIR ?= $(abspath ../shared/datasets)
export FEDHEALTH_DATA_DIR

# The tested versions of every dependency: installs use them, `make lock` refreshes them.
CONSTRAINTS := constraints.txt
EXTRAS := dev,postgres,mysql,onnx,gbdt,dashboard,browser,imaging

.PHONY: demo test lint typecheck bench clean lock

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

# Resolve the newest versions pyproject.toml allows in a scratch virtualenv and pin them all.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e '.[$(EXTRAS),bench]'
	echo "# Tested versions of fedhealth's dependencies; regenerate with \`make lock\`." > $(CONSTRAINTS)
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^fedhealth' >> $(CONSTRAINTS)
	rm -rf .lock-venv

demo: $(VENV)/.installed
	$(VENV)/bin/fedhealth demo

# Debian's chromium for the dashboard's browser tests (installed with apt when missing; a failure stops here)
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	bash .ci/install-chromium

# Two worker processes (pytest-xdist), each test file on one of them: the end-to-end tests wait on their
# services' processes much of the time, so two workers fill two cores (18.5 min instead of 26.5 on 2 cores,
# docs/benchmarks.md). TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed $(CHROMIUM)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
