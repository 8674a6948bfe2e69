# Two commands matter: `make demo` and `make test`. Both create .venv when it is
# missing or stale (the stamp is keyed on the packaging files' contents).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP_KEY := $(shell cat setup.cfg pyproject.toml $(wildcard examples/plugins/*/setup.cfg examples/plugins/*/*/*.py plugins/*/setup.cfg plugins/*/*/*.py) 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(STAMP_KEY)
PYTEST_ARGS ?=
# the suite runs on every core (at most 4: each worker may hold a few GiB), one test file per worker at a time so
# module-scoped training runs are shared; JOBS=1 runs it serially
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: setup test demo bench clean browser

setup: $(STAMP)

$(STAMP):
	@$(MAKE) --no-print-directory browser
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,interop]'
	@for p in plugins/*/ examples/plugins/*/; do [ -f $$p/setup.cfg ] && $(PY) -m pip install -q $$p || true; done
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "set-up done: $(VENV)"

# headless Chromium for the UI's browser tests (tests/test_ui_browser.py): installed when root and missing
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
		echo "note: installing chromium failed; the UI browser tests will be skipped"; \
	else echo "note: the UI browser tests will be skipped; install chromium and chromium-driver (as root: make browser)"; fi

test: setup
	$(PY) -m pytest $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile) --durations=15 $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/mindone-lora train --demo

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
