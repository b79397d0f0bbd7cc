# kdcache: `make demo` and `make test` each create .venv and install what they need.
# CPU torch where there is no GPU; GPU users: see README ("CUDA build").
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Set TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu128) to pick a CUDA build.
TORCH_INDEX ?=
EXTRAS ?= worker,service,client,hf,s3,dev
STAMP := $(VENV)/.kdcache-installed
PYTEST_ARGS ?=

.PHONY: env test lint typecheck pytest demo bench clean browser

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "upgrading pip in $(VENV)"
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  echo "installing torch==$(TORCH_VERSION) (a large download the first time; pip shows progress)"; \
	  if [ -n "$(TORCH_INDEX)" ]; then \
	    $(PY) -m pip install --progress-bar on "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)"; \
	  elif command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -m pip install --progress-bar on "torch==$(TORCH_VERSION)"; \
	  else \
	    $(PY) -m pip install --progress-bar on "torch==$(TORCH_VERSION)" \
	      || $(PY) -m pip install --progress-bar on "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	  fi; \
	fi
	@echo "installing kdcache (editable) with extras [$(EXTRAS)] and their dependencies"
	@# pip's own lines for what it downloads and installs; the already-satisfied ones are dropped
	set -o pipefail; $(PY) -m pip install --progress-bar on -e ".[$(EXTRAS)]" \
	  | { grep -v "^Requirement already satisfied" || true; }
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping of an editable install, so it checks the
# packages through a tree of symlinks named as they are imported.
typecheck: $(STAMP)
	@rm -rf build/mypy && mkdir -p build/mypy/kdcache
	@for d in core worker service client cli; do ln -s ../../../$$d build/mypy/kdcache/$$d; done
	cd build/mypy && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml kdcache

pytest: $(STAMP) browser
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# The dashboard's tests drive Debian's chromium through chromedriver (selenium); nothing
# downloads a browser. Installed here when missing (root + apt-get); fatal in CI, else the
# browser tests skip and say why.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver with apt-get (dashboard browser tests)"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver \
	      || { echo "apt-get could not install chromium"; [ -z "$$CI" ]; }; \
	  else \
	    echo "not root or no apt-get: the browser tests will be skipped"; [ -z "$$CI" ]; \
	  fi; \
	fi

test: lint typecheck pytest

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) bench/teacher_pass.py
	$(PY) bench/stream.py
	$(PY) bench/serve.py

clean:
	rm -rf build demo-out .pytest_cache .mypy_cache .ruff_cache

# The Docker Compose deployment, really run: builds every image offline on a private Docker
# daemon, runs a job on two workers (one killed mid-shard), compares with an embedded run, and
# removes all it made. Needs root; installs docker.io and debootstrap with apt-get if missing.
.PHONY: test-compose
test-compose: $(STAMP)
	PY=$(abspath $(PY)) bash scripts/test_compose.sh

# `kdcache slurm` on a real one-node Slurm cluster (munge, slurmctld, slurmd started here): an
# array of two workers, one cancelled mid-job, the cache compared with an embedded run. Needs
# root; installs munge, slurmctld, slurmd and slurm-client with apt-get if missing.
.PHONY: test-slurm
test-slurm: $(STAMP)
	PY=$(abspath $(PY)) bash scripts/test_slurm.sh
