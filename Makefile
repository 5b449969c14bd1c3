# Two commands do all the set-up: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow guest qemu fuzz conform-long bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

guest: $(STAMP)
	$(BIN)/python -m faultline.guest.build

# QEMU is a system package: installed here when missing and running as root; otherwise
# the QEMU tests skip, with the reason.
qemu:
	@command -v qemu-system-x86_64 >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing qemu-system-x86 (apt-get)"; \
	    (apt-get update -q && apt-get install -y -q qemu-system-x86) >/dev/null \
	      || echo "faultline: could not install qemu-system-x86: the QEMU tests will skip"; \
	  else \
	    echo "faultline: qemu-system-x86_64 missing (not root or no apt-get): the QEMU tests will skip"; \
	  fi; }

demo: guest qemu
	$(BIN)/faultline demo

test: guest qemu
	$(BIN)/ruff check faultline tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

test-slow: guest
	$(BIN)/python -m pytest -q -m slow

bench: guest
	$(BIN)/faultline bench all

# Differential testing, kvm vs model, with many random scenarios (the default run keeps 15).
conform-long: guest
	FAULTLINE_CONFORM_EXAMPLES=300 $(BIN)/python -m pytest -q tests/test_conform.py -k differential

# Long fuzzing profile for hostile guests (the default test run keeps a fast one).
fuzz: guest
	FAULTLINE_FUZZ_EXAMPLES=300 $(BIN)/python -m pytest -q tests/test_robustness.py -k random

clean:
	rm -rf $(VENV) build faultline/guest/out *.egg-info
