# Two entry points (see README): `make demo` runs the main job, `make test` the checks.
# Each creates and uses its own virtual environment in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

# setup.py and the C kernels: pip builds them (funnelrec/*/_*.c, _*.h) at install.
$(STAMP): pyproject.toml setup.py $(wildcard funnelrec/*/_*.c funnelrec/*/_*.h)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build first: with it installed, the range in pyproject installs nothing more.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/funnelrec demo

lint: $(STAMP)
	$(VENV)/bin/ruff check funnelrec tests benchmarks setup.py
	$(VENV)/bin/ruff format --check funnelrec tests benchmarks setup.py
	$(VENV)/bin/mypy funnelrec
	# The architecture's rules (pyproject.toml, [tool.importlinter]; docs/architecture.md).
	$(VENV)/bin/lint-imports

test: lint
	# One BLAS thread: the tests use small matrices, where threads only add overhead.
	OPENBLAS_NUM_THREADS=1 $(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
