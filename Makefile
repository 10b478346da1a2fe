# One Makefile for developers and CI: setup, test, lint, bench, demo.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the test suite and benchmarks start on loopback.
SYSTEM_PACKAGES := mosquitto postgresql
STAMP := $(VENV)/.installed

.PHONY: setup system-packages test lint format typecheck unit bench demo clean

setup: system-packages $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  for s in $$missing; do systemctl disable --now $$s >/dev/null 2>&1 || true; done; \
	fi

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: lint
	$(BIN)/pytest -m "not soak" -q

bench: setup
	$(BIN)/python -m benchmarks

demo: setup
	$(BIN)/python -m edgeloop.demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
