# Two commands matter: `make demo` and `make test`. Both create .venv when it is
# missing or stale (the stamp is keyed on the packaging files' contents), with the
# exact versions of constraints.txt. `make smoke` checks a second environment.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CONSTRAINTS := constraints.txt
STAMP_KEY := $(shell cat setup.cfg pyproject.toml $(CONSTRAINTS) $(wildcard examples/plugins/*/setup.cfg examples/plugins/*/*/*.py plugins/*/setup.cfg plugins/*/*/*.py) 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(STAMP_KEY)
PYTEST_ARGS ?=
# the suite runs on every core (at most 4: each worker may hold a few GiB), one test file per worker at a time so
# module-scoped training runs are shared; JOBS=1 runs it serially
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
# files go to the workers in the order tests/conftest.py gives them (the slowest first, so the run ends on short ones)
XDIST := $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile --no-loadscope-reorder)

# the smoke venv: what a mindone user already has (the newest MindSpore that works, docs/compatibility.md, and
# mindone), into which tests/test_wheel.py installs this package's wheels; pip's cache keeps the downloads
SMOKE_VENV := .venv-smoke
SMOKE_MINDSPORE ?= 2.10.0
SMOKE_PY := $(SMOKE_VENV)/bin/python
SMOKE_STAMP := $(SMOKE_VENV)/.installed-mindspore-$(SMOKE_MINDSPORE)

.PHONY: setup test smoke smoke-setup smoke-wheels smoke-rest demo bench clean browser

setup: $(STAMP)

$(STAMP):
	@$(MAKE) --no-print-directory browser
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev,interop]'
	@for p in plugins/*/ examples/plugins/*/; do \
		[ -f $$p/setup.cfg ] && $(PY) -m pip install -q -c $(CONSTRAINTS) $$p || true; done
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "set-up done: $(VENV)"

# headless Chromium for the UI's browser tests (tests/ui/test_ui_browser.py): installed when root and missing
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
		echo "note: installing chromium failed; the UI browser tests will be skipped"; \
	else echo "note: the UI browser tests will be skipped; install chromium and chromium-driver (as root: make browser)"; fi

.PHONY: lint
# ruff (pyproject.toml's [tool.ruff]: pyflakes, pycodestyle errors, import order); run first by make test
lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest $(XDIST) --durations=15 $(PYTEST_ARGS)

# the smoke subset (-m smoke) on the newest MindSpore that works, in two steps: smoke-wheels builds the wheels and
# installs them into the smoke venv (which brings the package's own dependencies) and runs the installed command;
# smoke-rest then runs the rest of the subset from this checkout (it needs those dependencies)
smoke: smoke-wheels
	@$(MAKE) --no-print-directory smoke-rest

smoke-setup: $(SMOKE_STAMP)

smoke-wheels: $(SMOKE_STAMP)
	PYTHONPATH=$(CURDIR) MINDONE_LORA_INSTALL_WHEELS=1 $(SMOKE_PY) -m pytest -m smoke tests/test_wheel.py $(PYTEST_ARGS)

smoke-rest: $(SMOKE_STAMP)
	PYTHONPATH=$(CURDIR) $(SMOKE_PY) -m pytest -m smoke --ignore=tests/test_wheel.py $(XDIST) --durations=5 \
		$(PYTEST_ARGS)

$(SMOKE_STAMP):
	@test -x $(SMOKE_PY) || $(PYTHON) -m venv $(SMOKE_VENV)
	$(SMOKE_PY) -m pip install -q --upgrade pip setuptools wheel build
	$(SMOKE_PY) -m pip install -q mindspore==$(SMOKE_MINDSPORE) mindone==0.5.0 pytest pytest-xdist tensorboardX
	@rm -f $(SMOKE_VENV)/.installed-*
	@touch $@
	@echo "smoke venv: $(SMOKE_VENV) (mindspore $(SMOKE_MINDSPORE))"

demo: setup
	$(VENV)/bin/mindone-lora train --demo

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(SMOKE_VENV) build dist *.egg-info .pytest_cache
