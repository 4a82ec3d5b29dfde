# Set-up and everyday commands.  `make demo` and `make test` work on a fresh
# machine: they create .venv, build the userfaultfd binding and install what
# they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml setup.py aiopostcopy/uffd/_build.py aiopostcopy/uffd/_cdefs.h aiopostcopy/uffd/_source.c \
		aiopostcopy/transport/_page_server_build.py aiopostcopy/transport/_page_server_cdefs.h \
		aiopostcopy/transport/_page_server_source.c aiopostcopy/tools/_touch_build.py \
		aiopostcopy/tools/_touch_cdefs.h aiopostcopy/tools/_touch_source.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m aiopostcopy demo

lint: $(STAMP)
	$(BIN)/lint-imports

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m aiopostcopy bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info aiopostcopy/uffd/_uffd*.so aiopostcopy/uffd/_uffd.c \
		aiopostcopy/transport/_page_server*.so aiopostcopy/transport/_page_server.c \
		aiopostcopy/tools/_touch*.so aiopostcopy/tools/_touch.c
