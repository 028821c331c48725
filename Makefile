# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
MAKE_START := $(shell date +%s.%N)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test benchmark pretrain gpu-check clean-runs

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	GREENCODE_MAKE_START=$(MAKE_START) $(PY) scripts/reproduce.py --config configs/default.yaml

# one pytest-xdist worker per core this process may run on (nproc honours CPU affinity), at most 4;
# on one core the suite runs in-process. Each test keeps torch at one thread (tests/conftest.py).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal) tests

# retrain the shipped base model (assets/default-base) from scratch, early-exit-ready with FIM, 512-token context,
# 21.3M tokens: ~2.2 h on 2 quiet CPU cores (resumable: scripts/pretrain.py --config configs/base.yaml --resume)
pretrain: $(STAMP)
	$(PY) scripts/pretrain.py --config configs/base.yaml
	$(PY) scripts/ship_base.py --config configs/base.yaml

# on a CUDA box, with the machine's own python (torch + transformers), no set-up, no downloads
gpu-check:
	$(PYTHON) scripts/gpu_check.py

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --config configs/default.yaml

clean-runs:
	rm -rf runs/
