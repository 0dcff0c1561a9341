# Two commands on a fresh machine with Python 3.11:
#   make chat   - build the tiny demo model if absent and chat with it
#   make test   - run the whole test suite
# Each one creates .venv and installs what it needs on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: chat test install clean

$(STAMP): setup.cfg requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/cpu.txt
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

chat: $(STAMP)
	$(BIN)/kimi-local chat

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
