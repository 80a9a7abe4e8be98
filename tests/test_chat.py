"""`kaki chat` as a user runs it: the real process, through a pipe and through a pseudo-terminal.

The tiny models are random, so their replies are word salad; what is checked is the machinery:
the rendered prompt against Persimmon's format as the seed README writes it, replies against
`kaki generate` on that same text, the KV cache's reuse against an independent count, the
settings, /save and /load, the context window, Ctrl-C and Ctrl-D.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import copy_tokenizer, make_hf_model, prefer_text_pieces

import kaki

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": "", "PYTHONUNBUFFERED": "1"}


def run_kaki(*args, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaki", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def chat(model_dir, script: list[str], *flags) -> subprocess.CompletedProcess:
    r = run_kaki("chat", "--model", model_dir, "--dtype", "float32", "--device", "cpu", *flags,
                 stdin="".join(line + "\n" for line in script))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


_loaded: dict = {}


def reference(model_dir) -> kaki.LLM:
    """The model through kaki's Python API, in this process (what `kaki generate` runs)."""
    if model_dir not in _loaded:
        _loaded[model_dir] = kaki.load(model_dir, dtype="float32", device="cpu")
    return _loaded[model_dir]


def greedy(model_dir, prompt: str, n: int) -> str:
    return reference(model_dir).generate(prompt, max_new_tokens=n)[0].text


def generate(model_dir, prompt: str, n: int, *flags) -> str:
    """`kaki generate`'s greedy continuation of `prompt` (the text after it)."""
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "--device", "cpu", "-n", n, "--json",
                 *flags, prompt)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["text"]


def persimmon_dir(tmp_path_factory, spm_dir, spm_proto, name: str, **config) -> Path:
    """A tiny Persimmon (so `--chat-format auto` is adept) whose greedy replies are words."""
    model = make_hf_model("persimmon", seed=5, **config)
    prefer_text_pieces(model, spm_proto)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    copy_tokenizer(spm_dir, path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_dir, spm_proto):
    return persimmon_dir(tmp_path_factory, spm_dir, spm_proto, "chat-persimmon")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return reference(model_dir).tokenizer


def adept(*turns: str) -> str:
    """Persimmon's chat format, written out from the seed README (its footnote for follow-ups):
    `human: {prompt}\\n\\nadept: {output}\\n\\nhuman: {follow_up}\\n\\nadept:`."""
    parts = []
    for i, t in enumerate(turns):
        parts.append(f"human: {t}" if i % 2 == 0 else f"adept: {t}")
    return "\n\n".join(parts) + "\n\nadept:"


def last_reply(saved: Path) -> str:
    msgs = json.loads(saved.read_text())
    assert msgs[-1]["role"] == "assistant"
    return msgs[-1]["content"]


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------- through a pipe


def test_scripted_session(model_dir, tokenizer, tmp_path):
    files = {k: tmp_path / f"{k}.json" for k in "ABCDE"}
    script = [
        "Hello there",
        "How are you?",
        "/raw_prompt",
        "/stats",
        f"/save {files['A']}",
        "/set temperature 0.8",
        "/set seed 7",
        "/retry",
        f"/save {files['B']}",
        "/retry",
        f"/save {files['C']}",
        "/set seed 8",
        "/retry",
        f"/save {files['D']}",
        "/frobnicate",
        "/rset",
        "/reset",
        "/set sample off",
        f"/load {files['A']}",
        "Thanks",
        "/raw_prompt",
        f"/save {files['E']}",
        "/quit",
        "this line is never read",
    ]
    r = chat(model_dir, script, "-n", 12)

    # Two greedy exchanges, saved as chat-completions messages.
    msgs = json.loads(files["A"].read_text())
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [msgs[0]["content"], msgs[2]["content"]] == ["Hello there", "How are you?"]
    r1, r2 = msgs[1]["content"], msgs[3]["content"]
    assert len(r1) > 5 and len(r2) > 5
    # Replies stream to stdout, one per line (stored without the trailing space streamed out).
    assert [line.rstrip() for line in r.stdout.splitlines()[:2]] == [r1, r2]

    # /raw_prompt is Persimmon's multi-turn format, and each greedy reply is what `kaki generate`
    # gives for that exact text (the second one came through the reused KV cache).
    prompt1, prompt2 = adept("Hello there"), adept("Hello there", r1, "How are you?")
    assert prompt2 + "\n" in r.stdout
    assert generate(model_dir, prompt1, 12).strip() == r1
    assert greedy(model_dir, prompt2, 12).strip() == r2

    # The engine counter: turn 2 ran only the tokens not already in the cache, which holds turn
    # 1's prompt and the reply tokens fed back while decoding (all but the last one sampled).
    ids1, ids2 = tokenizer.encode(prompt1), tokenizer.encode(prompt2)
    reply_ids = reference(model_dir).generate(prompt1, max_new_tokens=12)[0].token_ids
    cached = (ids1 + reply_ids)[:len(ids1) + len(reply_ids) - 1]
    m = re.search(r"last prompt: (\d+) tokens, (\d+) reused from the KV cache, (\d+) processed", r.stdout)
    n, reused, processed = map(int, m.groups())
    assert n == len(ids2)
    assert reused == shared_prefix(ids2, cached) >= len(ids1)
    assert processed == n - reused
    assert processed <= len(ids2) - len(ids1)

    # Seeded sampling: the same seed gives the same reply, another seed another one.
    b, c, d = (last_reply(files[k]) for k in "BCD")
    assert b == c
    assert d != b
    assert json.loads(files["B"].read_text())[:3] == msgs[:3]  # /retry replaced only the last reply

    # Unknown commands get a pointer to /help (and a guess when one is close).
    assert "unknown command /frobnicate" in r.stderr and "/help" in r.stderr
    assert "did you mean /reset?" in r.stderr

    # /load restored the history: the next prompt continues it, and /save has all of it.
    r3 = last_reply(files["E"])
    assert adept("Hello there", r1, "How are you?", r2, "Thanks") + "\n" in r.stdout
    assert json.loads(files["E"].read_text())[:4] == msgs
    assert r3 == greedy(model_dir, adept("Hello there", r1, "How are you?", r2, "Thanks"), 12).strip()

    # Every reply was cut at max_new_tokens and said so (no stop string in random words).
    assert r.stderr.count("[cut at max_new_tokens=12") == 6
    assert "never read" not in r.stdout + r.stderr


def test_commands_that_explain_themselves(model_dir):
    # A stop string (--stop adds one to the format's) ends the reply before it: not printed,
    # not stored, no cut marker.
    full = greedy(model_dir, adept("Hello there"), 12)
    stop = full.strip()[4:7]
    r = chat(model_dir, ["/help", "/hyperparameters", "/set temperature hot", "/set top_p 2", "/set colour blue",
                         "/raw_prompt", "/retry", "/undo", "/raw_say", "/save", "/load /nonexistent/x.json",
                         "Hello there", "/set max_new_tokens 300", "Hi", "/hyperparameters"],
             "-n", 12, "--top-k", 7, "--stop", stop)
    assert full[:full.index(stop)].strip() in r.stdout.splitlines()
    assert full.strip() not in r.stdout
    assert "cut at" not in r.stderr
    for name in ("help", "quit", "reset", "raw_prompt", "raw_say", "set", "hyperparameters", "undo", "retry",
                 "save", "load", "stats"):
        assert f"/{name}" in r.stdout
    assert "top_k = 7" in r.stdout and "max_new_tokens = 12" in r.stdout and "sample = off" in r.stdout
    assert "max_new_tokens = 300" in r.stdout  # the later /hyperparameters shows the change
    err = r.stderr
    assert "temperature: must be a number, got 'hot'" in err
    assert "top_p: must be in (0, 1]" in err
    assert "unknown setting 'colour'" in err
    assert "no prompt has been sent" in err
    assert "no reply to retry" in err
    assert "nothing to undo" in err
    assert "usage: /raw_say TEXT" in err and "usage: /save FILE" in err
    assert "/nonexistent/x.json does not exist" in err
    # 300 new tokens do not fit the 256-token context: refused with the numbers, shell goes on.
    assert "max_new_tokens 300 leaves no room" in err


def test_context_window_drops_oldest_turns(tmp_path_factory, spm_dir, spm_proto, tokenizer, tmp_path):
    """A long conversation on a 96-token model: the oldest turns leave the window (said once),
    the system text stays, every message still gets an answer, a message too long alone is refused."""
    small = persimmon_dir(tmp_path_factory, spm_dir, spm_proto, "chat-small-ctx", max_position_embeddings=96)
    questions = [f"Question {i}: what is the man said of the world?" for i in range(10)]
    too_long = " ".join(["the world is good and the man is old"] * 12)
    saved = tmp_path / "all.json"
    r = chat(small, [*questions[:6], too_long, *questions[6:], "/raw_prompt", "/stats", f"/save {saved}"],
             "-n", 8, "--system", "Be brief.", "--no-stream")
    msgs = json.loads(saved.read_text())
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in msgs[1::2]] == questions  # every question, none dropped from /save
    assert all(m["content"] for m in msgs[2::2])  # and every one answered
    assert r.stderr.count("oldest messages are left out") == 1
    assert re.search(r"this message is \d+ tokens .* but only 88 fit: the model's context is 96", r.stderr)

    # What the model saw last: the system text, then the most recent turns only, within budget.
    reply = msgs[-1]["content"]
    m = re.search(r"(?s)(Be brief\.\n\n.*?\nadept:)\n", r.stdout)
    prompt = m.group(1)
    assert questions[0] not in prompt and questions[-1] in prompt
    assert len(tokenizer.encode(prompt)) <= 96 - 8
    k = prompt.count("human: ")  # user turns in the window: the prompt holds the last 2k - 1 messages
    window = [x["content"] for x in msgs[1:-1]][-(2 * k - 1):]
    assert prompt == "Be brief.\n\n" + adept(*window)
    left_out = int(re.search(r"messages in the window, (\d+) left out", r.stdout).group(1))
    assert left_out == 20 - 2 * k > 0
    assert reply == greedy(small, prompt, 8).strip()


def test_bundled_model_missing_is_a_clear_error(tmp_path):
    """Without --model, the default is the bundled demo model; a checkout without it says how
    to get one (the message is the one `make chat` shows)."""
    from kaki.paths import bundled_model
    if bundled_model() is not None:
        r = run_kaki("chat", "--device", "cpu", stdin="/quit\n")
        assert r.returncode == 0, r.stderr
        return
    r = run_kaki("chat", stdin="Hello\n")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "recipes/kaki-tiny.sh" in r.stderr and "--model" in r.stderr


# ----------------------------------------------------------------------------- through a terminal


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, spm_dir, spm_proto):
    """Room for replies long enough to interrupt (8,000 tokens take seconds even on this model)."""
    return persimmon_dir(tmp_path_factory, spm_dir, spm_proto, "chat-long", max_position_embeddings=8192)


def spawn(model_dir, *flags):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "kaki", "chat", "--model", str(model_dir), "--dtype", "float32",
                                           "--device", "cpu", *map(str, flags)],
                          env=ENV, encoding="utf-8", timeout=60, dimensions=(24, 200))
    child.expect_exact(">>> ")
    return child


def test_ctrl_c_stops_a_reply_and_ctrl_d_quits(long_dir):
    import pexpect

    child = spawn(long_dir, "-n", 8000, "--chat-format", "plain")
    assert "kaki chat:" in child.before and "/help" in child.before  # the banner
    child.sendline("Hello")
    child.expect_exact("Hello\r\n")
    child.expect(r"\w{3}")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    assert "cut at" not in child.before
    # The shell is still there and still answers.
    child.sendline("/set max_new_tokens 4")
    child.expect_exact("[max_new_tokens = 4]")
    child.expect_exact(">>> ")
    child.sendline("Again")
    child.expect_exact("[cut at max_new_tokens=4")
    child.expect_exact(">>> ")
    child.sendline("/stats")
    child.expect(r"4 of 4 messages in the window")
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D at the prompt
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_quits(model_dir):
    import pexpect

    child = spawn(model_dir, "-n", 4)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
