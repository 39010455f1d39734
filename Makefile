# Cloud Film — two commands on a fresh Debian/Ubuntu machine with Python 3.11:
#   make run    install and start the archive with demo data on http://127.0.0.1:8000
#   make test   install the test tools (dcmtk, Orthanc, ...) and run every test
.PHONY: run test install lint typecheck pytest bench clean

PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/.venv
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_COMPILE_BYTECODE := 1
export UV_LINK_MODE := copy

run: install
	scripts/install-web
	.venv/bin/cloudfilm serve --demo

test: install
	scripts/install-test-deps
	scripts/install-web
	scripts/test

install: .venv/.installed

$(UV):
	scripts/bootstrap-python "$(PYTHON)"
	"$(PYTHON)" -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

.venv/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --locked
	.venv/bin/python -m compileall -q src
	touch $@

lint: install
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

typecheck: install
	.venv/bin/mypy

pytest: install
	.venv/bin/pytest

bench: install
	.venv/bin/python bench/ingest.py

clean:
	rm -rf .venv $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
