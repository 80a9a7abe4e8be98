"""`kaki serve` as a real process: graceful SIGTERM (in-flight requests finish, one that outlives
--graceful-timeout is cut off cleanly, nothing hangs), and the warning for a
non-loopback address without an API key."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from helpers import copy_tokenizer, make_hf_model

KAKI = [sys.executable, "-m", "kaki"]
# One intra-op thread: the tiny model gains nothing from two, and a busy machine makes OpenMP slow.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_dir):
    model = make_hf_model("persimmon", seed=3, max_position_embeddings=8192)
    path = tmp_path_factory.mktemp("serve-cli")
    model.save_pretrained(path)
    copy_tokenizer(spm_dir, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "kaki serve did not come up"
        time.sleep(0.2)


def stream_completion(url: str, max_tokens: int, out: dict, started: threading.Event) -> None:
    """Stream one greedy completion; record its events, or the error that ended it."""
    events = []
    out["events"] = events
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "prompt": "the", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append("DONE" if line == "data: [DONE]" else json.loads(line[6:]))
                    started.set()
    except httpx.HTTPError as e:
        out["error"] = e
    started.set()


def test_sigterm_finishes_in_flight_requests_then_exits(model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(KAKI + ["serve", "--model", str(model_dir), "--port", str(port), "--dtype", "float32",
                                    "--graceful-timeout", "1.5", "--max-batch-size", "4"],
                            env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, url)
        short, long = {}, {}
        ev_short, ev_long = threading.Event(), threading.Event()
        threads = [threading.Thread(target=stream_completion, args=(url, 100, short, ev_short)),
                   threading.Thread(target=stream_completion, args=(url, 8000, long, ev_long))]
        for t in threads:
            t.start()
        assert ev_short.wait(30) and ev_long.wait(30)  # both are generating
        proc.send_signal(signal.SIGTERM)
        # The listening socket closes at once: new clients are turned away...
        deadline = time.time() + 10
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
            except httpx.TransportError:
                break
            assert time.time() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        # uvicorn re-raises the signal once its shutdown is complete, so the exit status says
        # "ended by SIGTERM" (what service managers expect) rather than 0.
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    # ...the short request finished normally...
    assert "error" not in short
    assert short["events"][-1] == "DONE"
    assert short["events"][-2]["choices"][0]["finish_reason"] == "length"
    # ...and the one that would outlive --graceful-timeout was cut off, not left hanging.
    assert "DONE" not in long["events"]
    stderr = proc.stderr.read()
    assert "Finished server process" in stderr


def test_public_address_without_key_warns(tmp_path):
    out = subprocess.run(KAKI + ["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "warning: binding 0.0.0.0 without --api-key" in out.stderr
    assert "does not exist" in out.stderr  # then the model error, on one line


def test_loopback_detection():
    from kaki.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_serve_help_lists_the_limits():
    out = subprocess.run(KAKI + ["serve", "--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--max-batch-size", "--max-seq-len", "--max-queue", "--api-key", "--chat-format", "--host",
                 "--api-key-file", "--max-body-mb", "KAKI_API_KEY"):
        assert flag in out.stdout



@pytest.mark.parametrize("how", ["flag", "env", "file", "blank-file", "both"])
def test_an_empty_api_key_is_refused(tmp_path, how):
    """An empty key would leave the server open: one line, exit 2, before the model loads."""
    empty = tmp_path / "key"
    empty.write_text("\n" if how == "file" else "   \n")
    argv, env = KAKI + ["serve", "--model", str(tmp_path / "missing")], dict(ENV)
    env.pop("KAKI_API_KEY", None)
    if how == "flag":
        argv += ["--api-key", ""]
    elif how == "env":
        env["KAKI_API_KEY"] = ""
    elif how == "both":
        argv += ["--api-key", "k", "--api-key-file", str(empty)]
    else:
        argv += ["--api-key-file", str(empty)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and ("empty" in lines[0] or "not both" in lines[0]), out.stderr
    assert "does not exist" not in out.stderr  # refused before the model was looked at


def test_api_key_file_and_max_body_mb(model_dir, tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret-from-a-file\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in ENV.items() if k != "KAKI_API_KEY"}
    proc = subprocess.Popen(KAKI + ["serve", "--model", str(model_dir), "--port", str(port), "--dtype", "float32",
                                    "--api-key-file", str(key), "--max-body-mb", "0.5"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, url)
        body = {"prompt": "the", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        auth = {"Authorization": "Bearer s3cret-from-a-file"}
        assert httpx.post(url + "/v1/completions", json=body, headers=auth).status_code == 200
        r = httpx.post(url + "/v1/completions", json={**body, "pad": "x" * 600_000}, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    finally:
        proc.terminate()
        proc.wait(30)
