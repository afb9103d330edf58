# Two commands for a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   set up, then run a whole farm locally and render the demo campaign
#   make test   set up, then run the tests (real redis-server, S3 server, workers)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The tested torch release; pinned first so pip never pulls an unpinned CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup system system-test demo test lint bench-submit clean

system:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

# The report test renders its page in headless Chromium.
system-test: system
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

setup: system $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict

demo: setup
	$(BIN)/kleinfarm local --demo --workers 2

test: system-test setup
	$(BIN)/ruff check .
	$(BIN)/mypy shared producer worker
	$(BIN)/python -m pytest -q

bench-submit: setup
	$(BIN)/kleinfarm bench submit --jobs 10000

clean:
	rm -rf $(VENV) build dist *.egg-info .kleinfarm-local kleinfarm-out .kleinfarm.env
