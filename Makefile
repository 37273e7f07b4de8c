# keras-sam: `make demo` runs the main job, `make test` runs the tests. Both set up .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The versions the tests run with (see docs/development.md to bump them), and what the
# set-up installs: the dev and docs tools, plots, and every backend's CPU build.
CONSTRAINTS := constraints.txt
EXTRAS := dev,docs,plots,tensorflow-cpu,jax,torch,hub,tuner
# Installed without its dependencies (pyproject.toml's `hub` extra lists those it needs).
KERAS_HUB := keras-hub
# An unpinned torch resolves to a multi-GB CUDA build here; this version is the CPU one.
TORCH := torch==2.13.0
SITE := build/site

DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo playground test test-quick coverage lint bench results data clean docs docs-serve dist constraints

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps -c $(CONSTRAINTS) $(KERAS_HUB)
	touch $(STAMP)

# Fashion-MNIST from Debian's package where apt is available as root; elsewhere
# keras-sam downloads it into the Keras cache on first use.
data:
	@if [ ! -f $(DATA) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) \
		|| echo "warning: could not install dataset-fashion-mnist; it will be downloaded"; \
	fi

demo: $(STAMP) data
	$(BIN)/keras-sam compare

playground: $(STAMP)
	$(BIN)/keras-sam playground

# One pytest session per Keras backend (Keras picks its backend at import), each spread
# over JOBS worker processes (pytest-xdist; `auto`: one per core), test by test (a module
# whose tests share processes started once is kept on one worker: its `xdist_group`). Each
# session ends with its slowest tests and those over their budget (tests/budget.py;
# docs/development.md has each session's time).
BACKENDS := tensorflow jax torch
JOBS ?= auto
PYTEST := $(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup --durations=15

test: $(STAMP) data docs
	@set -e; for backend in $(BACKENDS); do \
		echo "== KERAS_BACKEND=$$backend"; \
		KERAS_BACKEND=$$backend $(PYTEST); \
	done

test-quick: $(STAMP) data
	@set -e; for backend in $(BACKENDS); do \
		echo "== KERAS_BACKEND=$$backend"; \
		KERAS_BACKEND=$$backend $(PYTEST) -m "not slow"; \
	done

# Line and branch coverage of keras_sam/ in each backend's session (slower than `make test`:
# the tracer), the figures a change to the suite is held to (docs/development.md).
coverage: $(STAMP) data
	@set -e; mkdir -p build; for backend in $(BACKENDS); do \
		echo "== KERAS_BACKEND=$$backend"; \
		KERAS_BACKEND=$$backend COVERAGE_FILE=build/coverage.$$backend \
			$(PYTEST) --cov=keras_sam --cov-branch --cov-report=; \
		$(BIN)/coverage report --data-file=build/coverage.$$backend | tail -1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check keras_sam tests benchmarks tools
	$(BIN)/ruff format --check keras_sam tests benchmarks tools

# --keras2 times Keras 2's SAM beside keras-sam's in the same rounds: tf_keras (the version
# matching TensorFlow's) goes into .venv without its dependencies, which TensorFlow already is.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "tf_keras~=$$($(BIN)/python -c 'from importlib.metadata import packages_distributions as p, version as v; print(v(p()["tensorflow"][0]).rsplit(".", 1)[0])').0"
	$(BIN)/python benchmarks/step_time.py --jit --keras2

# The label-noise study, then the accuracy-against-cost frontier of the cheaper methods,
# then the vision transformers (each a section of docs/RESULTS.md; finished runs under runs/
# are not trained again). VIT_ARGS: the ViT's scale; the default is the smaller of the two
# shapes in docs/RESULTS.md (a 4-block ViT with 7x7 patches): 15-30 minutes a run on 2 CPU
# cores, 12 runs; benchmarks/gpu_session.sh runs both shapes on a GPU in minutes.
VIT_ARGS ?= --patch 7 --dim 64 --depth 4 --heads 4
results: $(STAMP) data
	$(BIN)/python benchmarks/fashion_mnist.py
	$(BIN)/python benchmarks/frontier.py
	$(BIN)/python benchmarks/vit.py $(VIT_ARGS) --out runs/vit.json
	$(BIN)/python benchmarks/results_sections.py --vit runs/vit.json

# Diagnostics: what a Hessian-vector product and a 21x21 landscape cost; and the Hessian,
# sharpness and landscapes of the models `make results` saved (a section of docs/RESULTS.md).
.PHONY: bench-diagnostics inspect-results
bench-diagnostics: $(STAMP) data
	$(BIN)/python benchmarks/diagnostics.py

inspect-results: $(STAMP) data
	$(BIN)/python benchmarks/inspect_results.py --runs runs/results

# The documentation site (MkDocs + mkdocstrings), strict: a broken link, a missing page or
# an unresolved API reference fails the build. `make docs-serve` previews it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

# The wheel and the sdist, checked as PyPI would render and accept them.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# Re-resolves the newest versions the declared ranges allow, in a fresh environment, and
# writes them to $(CONSTRAINTS) (docs/development.md: bumping the tested versions).
constraints:
	rm -rf build/constraints-venv
	$(PYTHON) -m venv build/constraints-venv
	build/constraints-venv/bin/python -m pip install --quiet --upgrade pip
	build/constraints-venv/bin/python -m pip install --quiet ".[$(EXTRAS)]" "$(TORCH)"
	build/constraints-venv/bin/python -m pip install --quiet --no-deps $(KERAS_HUB)
	{ echo "# The versions \`make test\` installs and tests with (pip install -c $(CONSTRAINTS))."; \
	  echo "# Generated by \`make constraints\`; see docs/development.md before editing."; \
	  build/constraints-venv/bin/python -m pip freeze --exclude keras-sam \
	    | sed 's/^\(torch==[^+]*\)+cpu$$/\1/'; } > $(CONSTRAINTS)
	rm -rf build/constraints-venv

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache
