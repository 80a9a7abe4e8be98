"""`kaki generate` and `kaki info` as a user runs them: `python -m kaki` in a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import kaki


def run_kaki(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""}
    return subprocess.run([sys.executable, "-m", "kaki", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr, nothing on stdout, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(text_model_dir):
    return text_model_dir[1]


@pytest.fixture(scope="module")
def reference(model_dir):
    """What the Python API gives for the same prompt: the CLI must print exactly this."""
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    return llm.generate("The man said", max_new_tokens=12)[0]


# ----------------------------------------------------------------------------- working commands


def test_generate_end_to_end(model_dir, reference):
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "The man said")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The man said" + reference.text + "\n"
    assert len(reference.text) > 5  # sentencepiece decoded real pieces, not nothing


def test_generate_stream(model_dir, reference):
    """--stream prints what the plain command prints (the prompt, then the completion), as it comes."""
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "--stream", "The man said")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The man said" + reference.text + "\n"
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "--stream", "--no-prompt",
                 "The man said")
    assert r.returncode == 0, r.stderr
    assert r.stdout == reference.text + "\n"


def test_generate_prints_one_form_for_one_and_several_prompts(model_dir, reference):
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    other = llm.generate("Hello there", max_new_tokens=12)[0]
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "The man said", "-",
                 stdin="Hello there")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The man said" + reference.text + "\n---\n" + "Hello there" + other.text + "\n"
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "--no-prompt", "The man said",
                 "-", stdin="Hello there")
    assert r.stdout == reference.text + "\n---\n" + other.text + "\n"


def test_generate_prompt_arguments_take_backslash_escapes(model_dir):
    """The README's `kaki generate "human: ...\\n\\nadept:"`: the shell passes backslash-n, the model
    must see newlines; --raw and stdin keep text as it is."""
    from kaki.cli.generate import unescape
    assert unescape(r"human: hi\n\nadept:") == "human: hi\n\nadept:"
    assert unescape(r"a\tb\\n C:\dir \d") == "a\tb\\n C:\\dir \\d"
    typed = r"human: hi\n\nadept:"
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 2, "--json", typed, "-", stdin=typed)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["prompt"] == "human: hi\n\nadept:" and rows[1]["prompt"] == typed
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 2, "--json", "--raw", typed)
    assert json.loads(r.stdout)["prompt"] == typed


def test_generate_json_and_batch_and_stdin(model_dir, reference):
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "--json", "The man said", "-",
                 stdin="Hello there")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    assert rows[0]["prompt"] == "The man said" and rows[1]["prompt"] == "Hello there"
    assert rows[0]["text"] == reference.text and rows[0]["token_ids"] == reference.token_ids
    assert rows[0]["finish_reason"] == reference.finish_reason


def test_generate_sampling_flags_and_stop(model_dir, reference):
    stop = reference.text[3:7]
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 12, "--stop", stop, "--json",
                 "The man said")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["text"] == reference.text[:reference.text.find(stop)] and row["finish_reason"] == "stop"
    seeded = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 10, "-t", "1.2",
                      "--top-k", 20, "--top-p", 0.9, "--seed", 7, "--repetition-penalty", 1.1, "The man said")
    assert seeded.returncode == 0, seeded.stderr
    llm = kaki.load(model_dir, dtype="float32", device="cpu")
    want = llm.generate("The man said", max_new_tokens=10, temperature=1.2, top_k=20, top_p=0.9, seed=7,
                        repetition_penalty=1.1)[0]
    assert seeded.stdout == "The man said" + want.text + "\n"
    assert want.text != reference.text[:len(want.text)]  # sampled, not greedy: the flags arrived


def test_info(model_dir, text_model_dir):
    hf = text_model_dir[0]
    r = run_kaki("info", model_dir, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    n = sum(p.numel() for p in hf.parameters())
    assert info["family"] == "llama" and info["parameters"] == n
    assert {k: info["bytes"][k] for k in ("float32", "bfloat16", "float16")} == \
        {"float32": 4 * n, "bfloat16": 2 * n, "float16": 2 * n}
    # Quantized formats keep norms, biases and the gathered embedding in full precision.
    assert 2 * n > info["bytes"]["int8"] > info["bytes"]["int4"] > n // 4
    assert info["context_length"] == hf.config.max_position_embeddings
    assert info["vocab_size"] == hf.config.vocab_size and info["tokenizer"] == "sentencepiece"
    text = run_kaki("info", model_dir)
    assert text.returncode == 0, text.stderr
    assert "llama" in text.stdout and f"{n:,}" in text.stdout and "256 tokens" in text.stdout


@pytest.mark.parametrize("command", [[], ["generate"], ["info"]])
def test_help(command):
    r = run_kaki(*command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


# ----------------------------------------------------------------------------- bad input


def test_bad_flags_and_paths(tmp_path, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["generate", "--bogus", "x"], ["unrecognized arguments: --bogus"]),
        (["generate", "--model", tmp_path / "nowhere", "x"], ["does not exist"]),

        (["generate", "--model", empty, "x"], ["no config.json"]),
        (["generate", "--model", model_dir / "config.json", "x"], ["is a file"]),
        (["generate", "--model", model_dir, "--top-p", "2", "x"], ["top_p", "(0, 1]"]),
        (["generate", "--model", model_dir, "--max-new-tokens", "-1", "x"], ["max_new_tokens", ">= 0"]),
        (["generate", "--model", model_dir, "--max-new-tokens", "abc", "x"], ["invalid int value: 'abc'"]),
        (["generate", "--model", model_dir, "--dtype", "float8", "x"], ["invalid choice: 'float8'"]),
        (["generate", "--model", model_dir, "--device", "tpu", "x"], ["device must be"]),
        (["generate", "--model", model_dir, "--stream", "a", "b"], ["--stream takes exactly one prompt"]),
        (["generate", "--model", model_dir, "the man " * 200], ["context is 256", "shorten it"]),
        (["info", tmp_path / "nowhere"], ["does not exist"]),
        (["info", tmp_path, "extra"], ["unrecognized arguments: extra"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ]
    procs = [(args, needles, subprocess.Popen(
        [sys.executable, "-m", "kaki", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""})) for args, needles in cases]
    for args, needles, p in procs:
        out, err = p.communicate(timeout=120)
        one_line_error(subprocess.CompletedProcess(args, p.returncode, out, err), *needles)


def test_notes_on_the_terminal_are_plain_sentences(model_dir, monkeypatch):
    """kaki's own notes (here: int8 falling back to fbgemm) print as the message alone, not
    loguru's `2026-... | INFO | kaki.native:fallback:220 - ...` debug line."""
    import re
    monkeypatch.setenv("KAKI_NO_NATIVE", "1")
    r = run_kaki("generate", "--model", model_dir, "--dtype", "float32", "-n", 2, "--quantize", "int8", "hi")
    assert r.returncode == 0, r.stderr
    assert "KAKI_NO_NATIVE is set" in r.stderr
    assert not re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d|\| INFO|kaki\.quant\.native:", r.stderr), r.stderr


def test_a_missing_relative_model_path_does_not_exist(tmp_path):
    """`--model runs/nothere` with a local runs/ folder is a path that is not there, not a hub id to
    download."""
    (tmp_path / "runs").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""}
    r = subprocess.run([sys.executable, "-m", "kaki", "generate", "--model", "runs/nothere", "x"], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    line = one_line_error(r, "does not exist")
    assert "hf download" not in line
