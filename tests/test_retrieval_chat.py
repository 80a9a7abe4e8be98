"""`kaki chat --retrieval` and `kaki serve --retrieval` with a tiny random Persimmon: the passage the
index ranks first is in the exact prompt the model ran (/raw_prompt, the server's token count),
/sources and the response's `sources` name it, and `retrieval: false` leaves the prompt plain.
The index is BM25-only (no embedder) so the ranking is easy to predict and the test is fast."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import kaki
from kaki.chat_format import format_for_dir, with_context
from kaki.retrieval import Retriever, build_index

from helpers import hf_model_dir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": "", "PYTHONUNBUFFERED": "1"}
QUESTION = "What stops alpha particles?"
ALPHA = "Alpha particles are helium nuclei. A sheet of paper stops them."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_dir):
    return hf_model_dir("persimmon", tmp_path_factory.mktemp("rag-persimmon"), spm_dir, seed=5,
                        max_position_embeddings=1024)[1]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    docs = tmp_path_factory.mktemp("rag-docs")
    (docs / "alpha.md").write_text(f"# Alpha rays\n\n{ALPHA}\n")
    (docs / "beta.md").write_text("# Beta rays\n\nBeta particles are electrons. Aluminium stops them.\n")
    out = docs / "physics.kaki-index"
    build_index([docs], out, embedder="none", progress=False)
    return out


def expected_prompt(model_dir, index, question: str) -> tuple[str, list]:
    """The prompt for `question` built independently: the index's top passages (as many as the
    chat asks for) in chat_format's context block, rendered with the model's chat format."""
    with Retriever.open(index) as r:
        hits = r.search(question, k=3)
    fmt = format_for_dir(model_dir)
    text = fmt.render([{"role": "user", "content": with_context(question, [p.as_context() for p in hits])}])
    return text, hits


def test_chat_puts_the_retrieved_passage_into_the_prompt(model_dir, index):
    script = f"/sources\n{QUESTION}\n/raw_prompt\n/sources\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "kaki", "chat", "--model", model_dir, "--dtype", "float32",
                        "--device", "cpu", "-n", "4", "--temperature", "0", "--retrieval", index],
                       input=script, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "nothing asked yet" in r.stderr  # /sources before any question
    prompt, hits = expected_prompt(model_dir, index, QUESTION)
    assert hits[0].title == "Alpha rays" and ALPHA in prompt
    assert prompt + "\n" in r.stdout  # /raw_prompt printed exactly the independently built prompt
    sources = r.stdout[r.stdout.index(prompt) + len(prompt):]
    assert "[1] Alpha rays" in sources and "alpha.md:3" in sources


def test_grounded_replies_cite_their_passages_and_echo_shows_the_questions(model_dir, index):
    """Under each grounded reply, one line per passage the model was given (title and where to
    read it); with --echo a piped transcript shows each question before its answer."""
    r = subprocess.run([sys.executable, "-m", "kaki", "chat", "--model", model_dir, "--dtype", "float32",
                        "--device", "cpu", "-n", "4", "--temperature", "0", "--retrieval", index,
                        "--retrieval-k", "1", "--echo"],
                       input=f"{QUESTION}\n/quit\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f">>> {QUESTION}"
    assert lines[2] == "  [1] Alpha rays: alpha.md:3" and len(lines) == 3, r.stdout  # reply, then its source
    plain = subprocess.run([sys.executable, "-m", "kaki", "chat", "--model", model_dir, "--dtype", "float32",
                            "--device", "cpu", "-n", "4", "--temperature", "0"],
                           input=f"{QUESTION}\n/quit\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert len(plain.stdout.splitlines()) == 1  # no echo, and no sources without --retrieval


def test_chat_without_an_index_has_no_sources(model_dir):
    r = subprocess.run([sys.executable, "-m", "kaki", "chat", "--model", model_dir, "--dtype", "float32",
                        "--device", "cpu"], input="/sources\n/quit\n", capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0 and "start the chat with --retrieval INDEX" in r.stderr


class Server:
    """uvicorn serving `app` from a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


def test_server_grounds_chat_completions_and_reports_sources(model_dir, index):
    from kaki.serve.app import create_app
    from kaki.serve.engine import Engine, EngineConfig

    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    server = Server(create_app(Engine(llm, EngineConfig(max_batch_size=2), model_name="tiny"),
                               retriever=Retriever.open(index)))
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
                "temperature": 0}
        grounded = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
        plain = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "retrieval": False}, timeout=120).json()
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as s:
            first = json.loads(next(line for line in s.iter_lines() if line.startswith("data: "))[6:])
    finally:
        server.stop()
    prompt, hits = expected_prompt(model_dir, index, QUESTION)
    fmt = format_for_dir(model_dir)
    n_tokens = lambda text: len(llm.tokenizer.encode(text, add_bos=fmt.add_bos))  # noqa: E731
    assert [s["title"] for s in grounded["sources"]] == [p.title for p in hits]
    # sources[]: title, path relative to the indexed folder, line, text (no url: a file, not a record).
    assert {k: grounded["sources"][0][k] for k in ("path", "line", "text")} == {"path": "alpha.md", "line": 3,
                                                                             "text": ALPHA}
    assert "url" not in grounded["sources"][0] and str(index.parent) not in json.dumps(grounded)
    # The model ran exactly the grounded prompt; with `retrieval: false`, exactly the plain one.
    assert grounded["usage"]["prompt_tokens"] == n_tokens(prompt)
    plain_prompt = fmt.render([{"role": "user", "content": QUESTION}])
    assert plain["sources"] is None and plain["usage"]["prompt_tokens"] == n_tokens(plain_prompt)
    assert first["sources"] == grounded["sources"]
