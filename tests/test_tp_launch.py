"""Launching tensor parallelism on CPU (gloo): `torchrun --nproc-per-node 2 -m kaki serve|generate
--tensor-parallel 2` answers as one process does (rank 0 runs HTTP and the scheduler, rank 1 follows
its steps); a rank that dies or hangs ends the other with an error within the collective timeout;
SIGTERM on rank 0 stops both.

Each launch costs seconds on two cores: one torchrun server, one torchrun generate, and two
`kaki chat` launches of two ranks started directly (torchrun would itself stop the survivor of a
dead rank, which would hide whether kaki does). Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import kaki
from kaki.cli import main
from kaki.serve.app import create_app
from kaki.serve.engine import Engine, EngineConfig

# model_dir: test_serve_http's tiny Persimmon whose greedy output decodes to words.
from test_serve_http import SEED_CURL, Server, model_dir  # noqa: F401

TIMEOUT_S = 2  # KAKI_COLLECTIVE_TIMEOUT of every launch (joining gets minutes: kaki.distributed)
START_S = 60  # the most a launch may take to answer /health
ENGINE = dict(max_batch_size=4, prefix_cache_mb=8)  # the prefix cache is on: n=2 shares a long prompt
LONG = "Once upon a time, in a small town by the sea, there lived an old fisherman and his wife, who"
SPECULATE = "ngram:3"  # drafts accepted and rejected: every rank must roll back alike


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KAKI_COLLECTIVE_TIMEOUT": str(TIMEOUT_S), **extra}


def serve_argv(model_dir: Path, port: int) -> list[str]:
    return ["serve", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--port", str(port),
            "--tensor-parallel", "2", "--max-batch-size", str(ENGINE["max_batch_size"]),
            "--prefix-cache-mb", str(ENGINE["prefix_cache_mb"]), "--speculate", SPECULATE, "--log-level", "warning"]


def torchrun(*argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kaki",
            *argv]


def wait_healthy(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.time() + START_S
    while True:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, "a rank exited while starting: " + " | ".join(f.read_text()[-1500:] for f in logs)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the 2-rank server did not come up"
        time.sleep(0.2)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def one_rank_url(model_dir):
    llm = kaki.load(model_dir, dtype="float32", device="cpu", speculate=SPECULATE)
    s = Server(create_app(Engine(llm, EngineConfig(**ENGINE), model_name=model_dir.name)))
    yield s.url
    s.stop()


def metric(url: str, name: str) -> float:
    line = next(x for x in httpx.get(url + "/metrics", timeout=5).text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def ask_everything(url: str, model: str) -> dict:
    """The seed's curl, and the openai client's completions and chat (greedy, seeded, n=2)."""
    import openai

    out = {}
    curl = subprocess.run(SEED_CURL.replace("<address of server>", url), shell=True, capture_output=True,
                          text=True, timeout=60)
    assert curl.returncode == 0, curl.stderr
    out["curl"] = json.loads(curl.stdout)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    c = client.completions.create(model=model, prompt=["The history of", "In a small town"], max_tokens=16,
                                  temperature=0)
    out["greedy"] = [ch.text for ch in c.choices]
    c = client.completions.create(model=model, prompt=LONG, max_tokens=16, temperature=1.0,
                                  seed=7, n=2)
    out["seeded_n2"] = [ch.text for ch in c.choices]
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello, who are you?"}],
                                       max_tokens=16, temperature=0)
    out["chat"] = r.choices[0].message.content
    return out


def test_two_rank_server_answers_like_one_rank(model_dir, one_rank_url, tmp_path):
    port = free_port()
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        p = subprocess.Popen(torchrun(*serve_argv(model_dir, port)), env=env(), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [p], [log])
        two = ask_everything(url, model_dir.name)
        # A request without a seed: rank 0 picks one for every rank. Were the ranks to sample
        # differently, rank 1 would find that its step decided otherwise and end the job.
        r = httpx.post(url + "/v1/completions", json={"model": model_dir.name, "prompt": "Yes", "max_tokens": 12,
                                                      "temperature": 1.0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert p.poll() is None
        drafted, accepted = (metric(url, f"kaki_spec_{k}_tokens_total") for k in ("draft", "accepted"))
        assert drafted > accepted > 0, (drafted, accepted)
        assert metric(url, "kaki_prefix_cache_hit_tokens_total") > 0  # the second of n=2 reused the first's blocks
        # SIGTERM on rank 0 alone: it shuts down and tells rank 1 to stop; torchrun, which would
        # stop every rank itself had one failed, exits 0 only when both ended cleanly.
        os.kill(rank_pids(p.pid)[0], signal.SIGTERM)
        assert p.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    assert two == ask_everything(one_rank_url, model_dir.name)
    assert two["greedy"][0] and two["curl"]["generations"][0]


def test_torchrun_generate_prints_what_one_process_prints(model_dir, capsys):
    argv = ["generate", "The history of", "In a small town", "-n", "12", "-t", "0", "--model", str(model_dir),
            "--dtype", "float32", "--device", "cpu"]
    p = subprocess.run(torchrun(*argv, "--tensor-parallel", "2"), env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert main(argv) == 0
    one = capsys.readouterr().out
    assert p.stdout == one  # rank 0 prints, rank 1 does not
    assert one.count("---") == 1 and len(one) > 40


def test_tensor_parallel_must_equal_the_process_count(model_dir, capsys):
    assert main(["generate", "hi", "--model", str(model_dir), "--tensor-parallel", "2"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nproc-per-node 2" in err and "\n" == err[-1] and err.count("\n") == 1


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux: /proc)."""
    out = {}
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env_vars = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((v[5:] for v in env_vars if v.startswith(b"RANK=")), None)
            if rank is not None:
                out[int(rank)] = int(pid)
    return out


def launch_chat(model_dir: Path, tmp: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two ranks of `kaki chat --tensor-parallel 2` started as torchrun starts them (its
    environment) but without torchrun, which would itself stop the survivor of a dead rank; once
    rank 0 has answered a message (the ranks ran steps together) and waits for the next."""
    master = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp / f"rank{rank}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "kaki", "chat", "--model", str(model_dir), "--dtype", "float32", "--device",
                 "cpu", "-n", "4", "--tensor-parallel", "2"], stdin=subprocess.PIPE, stdout=f,
                stderr=subprocess.STDOUT, text=True,
                env=env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master))))
    procs[0].stdin.write("Hello\n")
    procs[0].stdin.flush()
    deadline = time.time() + START_S
    while not any(line.strip() and not line.startswith(("small-M", "[")) for line in logs[0].read_text().splitlines()):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            stop(procs)
            pytest.fail("the 2-rank chat did not answer: " + " | ".join(f.read_text()[-1500:] for f in logs))
        time.sleep(0.1)
    return procs, logs


def wait_exit(p: subprocess.Popen, within: float) -> int:
    try:
        return p.wait(within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running {within} s after the other one went away (a hang)")


def test_a_killed_rank_ends_the_other_with_an_error(model_dir, tmp_path):
    procs, logs = launch_chat(model_dir, tmp_path)
    try:
        time.sleep(TIMEOUT_S * 1.5)  # idle past the timeout: heartbeats keep rank 1 waiting, not failing
        assert all(p.poll() is None for p in procs), " | ".join(f.read_text()[-1500:] for f in logs)
        procs[1].kill()
        # Rank 0 learns it from its next heartbeat (every TIMEOUT_S / 4 here).
        assert wait_exit(procs[0], TIMEOUT_S + 5) == 1
        assert "lost another rank" in logs[0].read_text(), logs[0].read_text()[-2000:]
    finally:
        stop(procs)


def test_a_hung_rank_ends_the_step_within_the_timeout(model_dir, tmp_path):
    procs, logs = launch_chat(model_dir, tmp_path)
    try:
        procs[1].send_signal(signal.SIGSTOP)  # alive but not answering: only the timeout can tell
        t0 = time.time()
        procs[0].stdin.write("Tell me more\n")
        procs[0].stdin.flush()
        assert wait_exit(procs[0], TIMEOUT_S + 10) == 1
        assert time.time() - t0 >= TIMEOUT_S * 0.9  # it waited for the collective's timeout
        # The step's message or one of its collectives timed out, whichever rank 1 left waiting.
        assert "error: tensor-parallel rank 0 lost another rank" in logs[0].read_text() \
            or "error: a forward pass of a tensor-parallel step failed on rank 0" in logs[0].read_text(), \
            logs[0].read_text()[-2000:]
        procs[1].send_signal(signal.SIGCONT)  # rank 0 is gone: rank 1 ends too
        assert wait_exit(procs[1], 10) == 1
        assert "error:" in logs[1].read_text(), logs[1].read_text()[-2000:]
    finally:
        stop(procs)