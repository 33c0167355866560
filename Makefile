# Two entry points for a fresh machine: `make demo` and `make test`. Both build the virtual environment first
# (pinned by constraints.txt), so nothing has to be installed by hand. The demo installs only what the package needs
# to run; the test tools (pytest, Ray, Playwright, schemathesis, PyOD) are added by `make test` only.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install install-dev clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip uninstall -y -q debias 2>/dev/null || true  # the distribution's old name, from older checkouts
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/debias demo --out runs/demo

# Two pytest workers, each file in one worker (--dist loadfile: a file's fixtures and servers stay together): many
# tests wait on subprocesses, servers and torchrun, so the suite takes about two thirds of the time on 2 cores.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs
