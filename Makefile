# hvdinfer: build, test, demo, bench. Every target sets up what it needs from nothing.
#   make demo    the main job, from scratch
#   make lm      train a GPT-2-layout model on Shakespeare, NP ranks, LM_MINUTES (20) -> runs/lm/model
#   make test    install, unit tests, the parallel tests (size 1, mpirun -np 2 and 3), integration, multi-host
#   make bench   side-by-side ratios (JSON + PNG under bench-out/), the peer in .venv-peer (make peer-env)
#   make install idempotent: apt MPI, .venv, pinned stack, Horovod 0.28.1 from source, hvdinfer

SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3.11
VENV := .venv
# The peer that bench peer measures against (torch, transformers, sentence-transformers): its own venv.
PEER_VENV := .venv-peer
PY := $(VENV)/bin/python
HVD := $(VENV)/bin/hvdinfer
NP ?= 2
# Horovod: root-safe, oversubscribe-safe mpirun for this 2-core machine and CI.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1
# Local ranks inherit this environment; add -x VAR for multi-host runs (launch/run.sh does).
MPIRUN := mpirun --oversubscribe --bind-to none
PYTEST := $(PY) -m pytest -q -p no:cacheprovider --color=no

# This machine's pip config names local index folders that may not exist: drop that noise only.
PIP_FILTER := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

HOROVOD_BUILD_ENV := HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
	HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j2

.PHONY: install mpi test unit parallel integration demo lm bench loadtest peer-env peer-env-best-effort clean doctor test-multihost iproute2

install: mpi $(VENV)/.stamp-hvdinfer

# Debian's Open MPI, only when missing (dpkg -s is a fast local check).
mpi:
	@if ! dpkg -s openmpi-bin libopenmpi-dev >/dev/null 2>&1; then \
		echo "installing Debian openmpi-bin libopenmpi-dev"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-deps: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip $(PIP_FILTER)
	$(PY) -m pip install -q -r requirements.txt $(PIP_FILTER)
	touch $@

# Horovod is compiled against the TF in the venv; rebuilt only when that TF changes or it fails to load.
$(VENV)/.stamp-horovod: $(VENV)/.stamp-deps
	if $(PY) -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '0.28.1'; assert h.mpi_built() and h.gloo_built()" 2>/dev/null; then \
		echo "horovod 0.28.1 already built against this TF"; \
	else \
		echo "building horovod 0.28.1 from source (about 2-3 minutes)"; \
		$(HOROVOD_BUILD_ENV) $(PY) -m pip install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps horovod==0.28.1 $(PIP_FILTER); \
	fi
	touch $@

$(VENV)/.stamp-hvdinfer: $(VENV)/.stamp-horovod setup.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(PIP_FILTER)
	touch $@

doctor: install
	$(MPIRUN) -np $(NP) $(HVD) doctor

unit: install
	$(PYTEST) tests/unit

# Every file under plain pytest (size 1), then under one mpirun of 2 ranks, then the files that mark
# NP3 = True (uneven shards) under one mpirun of 3: three launches instead of one per file and size.
parallel: install
	echo "== tests/parallel (size 1)"; $(PYTEST) tests/parallel
	echo "== tests/parallel (mpirun -np 2)"; $(MPIRUN) -np 2 $(PYTEST) tests/parallel
	echo "== tests/parallel, NP3 files (mpirun -np 3)"; $(MPIRUN) -np 3 $(PYTEST) $$(grep -l "^NP3 = True" tests/parallel/test_*.py)

integration: install
	$(PYTEST) tests/integration

# Hosts as network namespaces on this machine (hvdinfer cluster); skipped, with the reason, where
# namespaces cannot be made (not root, no iproute2).
test-multihost: install iproute2
	$(PYTEST) tests/multihost

iproute2:
	@if ! command -v ip >/dev/null || ! command -v tc >/dev/null; then \
		echo "installing Debian iproute2"; export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 >/dev/null || \
		echo "iproute2 could not be installed: the multi-host tests will skip"; \
	fi

test: install
	$(MAKE) --no-print-directory unit parallel integration test-multihost

demo: install
	$(HVD) demo --np $(NP)

# --resume: an interrupted run continues (within what is left of LM_MINUTES); a finished one is kept.
LM_DIR ?= runs/lm
LM_MINUTES ?= 20
lm: install
	$(MPIRUN) -np $(NP) $(HVD) pretrain --output-dir $(LM_DIR) --max-minutes $(LM_MINUTES) --eval-every 300 --resume

bench: install peer-env-best-effort
	$(HVD) bench --np $(NP) --out bench-out

# The serving load test on loopback (hvdinfer/bench/serve.py): CLIENTS x REQUESTS embeddings and
# CLIENTS x COMPLETION_REQUESTS completions on 1 and NP ranks, zero errors; bench-out/serve.{json,png}.
CLIENTS ?= 64
REQUESTS ?= 500
COMPLETION_REQUESTS ?= 20
loadtest: install
	$(HVD) bench serve --np $(NP) --out bench-out --clients $(CLIENTS) --requests $(REQUESTS) \
		--completion-requests $(COMPLETION_REQUESTS)

# Where the peer env cannot be built, bench peer says why in one line and skips. A recipe of its own:
# make -n runs a recipe that names $(MAKE), and under .ONESHELL that would be the whole bench recipe.
peer-env-best-effort:
	$(MAKE) --no-print-directory peer-env || echo "make peer-env failed: bench peer will be skipped"

# torch first and alone, so pip takes the CPU wheel on this machine's disk, then the rest at their pins.
peer-env: $(PEER_VENV)/.stamp

$(PEER_VENV)/.stamp: requirements-peer.txt
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q "$$(grep '^torch==' requirements-peer.txt)" $(PIP_FILTER)
	$(PEER_VENV)/bin/python -m pip install -q -r requirements-peer.txt $(PIP_FILTER)
	$(PEER_VENV)/bin/python -c "import torch, sentence_transformers"
	touch $@

clean:
	rm -rf $(VENV) $(PEER_VENV) build dist *.egg-info bench-out demo-out .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
