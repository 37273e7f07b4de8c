# keras-sam: `make demo` runs the main job, `make test` runs the tests. Both set up .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo playground test test-quick lint bench results data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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

test: $(STAMP) data
	$(BIN)/python -m pytest -q

test-quick: $(STAMP) data
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check keras_sam tests benchmarks
	$(BIN)/ruff format --check keras_sam tests benchmarks

# --keras2 times Keras 2's SAM beside keras-sam's in the same rounds: tf_keras (the version
# matching TensorFlow's) goes into .venv without its dependencies, which TensorFlow already is.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "tf_keras~=$$($(BIN)/python -c 'from importlib.metadata import packages_distributions as p, version as v; print(v(p()["tensorflow"][0]).rsplit(".", 1)[0])').0"
	$(BIN)/python benchmarks/step_time.py --jit --keras2

results: $(STAMP) data
	$(BIN)/python benchmarks/fashion_mnist.py

# Diagnostics: what a Hessian-vector product and a 21x21 landscape cost; and the Hessian,
# sharpness and landscapes of the models `make results` saved (a section of docs/RESULTS.md).
.PHONY: bench-diagnostics inspect-results
bench-diagnostics: $(STAMP) data
	$(BIN)/python benchmarks/diagnostics.py

inspect-results: $(STAMP) data
	$(BIN)/python benchmarks/inspect_results.py --runs runs/results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
