# Quick start: `make demo` (set up and run the bundled example), `make test` (set up and run every test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgeq-installed
CROSS_PACKAGES := gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static

.PHONY: demo test test-quick toolchains bench bench-zoo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/edgeq demo

# Cross compilers for the Raspberry Pi presets (and qemu, the emulated Pi) come from Debian; installed when
# missing and we are root.
toolchains:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v arm-linux-gnueabihf-gcc >/dev/null \
	    || ! command -v qemu-aarch64-static >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CROSS_PACKAGES) >/dev/null; \
	  else echo "note: cross compilers missing; install them with: sudo apt-get install $(CROSS_PACKAGES)"; fi; \
	fi

# The full suite (what CI runs): includes the slow end-to-end tests.
test: $(STAMP) toolchains
	$(BIN)/python -m pytest -q

# The quick run: everything but the tests marked slow.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/latency.py

# The architectures users bring (torchvision, Ultralytics, a BERT-style encoder) against ORT and OpenVINO:
# about 40 minutes on 2 cores; writes benchmarks/results/zoo-<cpu>.md.
bench-zoo: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/zoo.py
