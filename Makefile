# Two commands on a fresh machine:  `make demo` and `make test`.
# Both create (or reuse) the virtual environment $(VENV), installed from the lock file, then act.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
LOCK := requirements/constraints.txt
# The environment is keyed by the lock file and pyproject.toml: change either and it is re-installed.
DEPS_KEY := $(shell cat $(LOCK) pyproject.toml examples/kdrun-example-plugin/pyproject.toml | sha1sum | cut -c1-12)
DEPS_STAMP := $(VENV)/.deps-$(DEPS_KEY)
DOCS_STAMP := $(VENV)/.docs-$(DEPS_KEY)
PYTEST_ARGS ?=

.PHONY: install install-plugin demo test test-e2e lint docs test-all bench clean

$(DEPS_STAMP):  # content-keyed (DEPS_KEY), so a fresh clone reuses a matching environment
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[test]'
	@rm -f $(VENV)/.deps-*
	@touch $@

# A cached environment may hold an editable install of another checkout: point it at this one.
install: $(DEPS_STAMP)
	@$(PY) -I -c "import kdrun, pathlib, sys; sys.exit(pathlib.Path(kdrun.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())" 2>/dev/null \
	  || $(PY) -m pip install --quiet --no-deps -e .

demo: install
	$(VENV)/bin/kdrun

# The example plugin package (examples/kdrun-example-plugin): the tests use it through its entry point.
install-plugin: install
	@$(PY) -I -c "import kdrun_example_plugin, pathlib, sys; sys.exit(not pathlib.Path(kdrun_example_plugin.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()))" 2>/dev/null \
	  || $(PY) -m pip install --quiet --no-deps --no-build-isolation -e examples/kdrun-example-plugin

# ruff, and the layering declared in pyproject.toml ([tool.importlinter]): no import cycles, no layer importing one above it.
lint: install
	$(VENV)/bin/ruff check kdrun tests benchmarks examples
	$(VENV)/bin/lint-imports

# The manual as a site (mkdocs.yml, docs/), built into site/. --strict: a broken link or anchor, a page missing from
# the nav or a docstring mkdocstrings cannot load fails it (never add --quiet: it hides the warnings --strict
# counts, and the build passes). The `docs` extra stays out of the core install: it is
# added to the environment here, once per DEPS_KEY (its pins are in the lock file, so a change re-installs it).
$(DOCS_STAMP): $(DEPS_STAMP)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[docs]'
	@rm -f $(VENV)/.docs-*
	@touch $@

docs: install $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The default suite: lint, the docs build, unit tests + end-to-end CLI runs on tiny configs (a few minutes on 2 cores).
# pytest-xdist runs one worker per core (one torch thread each, tests/conftest.py), a test file per worker at a time
# (module fixtures are built once).
test: install-plugin lint docs
	$(PY) -m pytest -m "not slow and not gpu and not e2e" -n auto --dist loadfile $(PYTEST_ARGS)

# The process-level tests the default suite leaves out: SIGKILL and signal resumes, concurrent runs and sweeps, the
# sweep launchers, data-parallel ranks (each starts, kills or races several kdrun processes: ~6 s of imports
# apiece). CI runs them too.
test-e2e: install-plugin
	$(PY) -m pytest -m "e2e and not slow and not gpu" -n auto --dist load $(PYTEST_ARGS)

# Everything, including the slower runs on real data sets.
test-all: install-plugin
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build site *.egg-info .pytest_cache
