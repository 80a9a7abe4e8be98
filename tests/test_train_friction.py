"""`kaki train` as a newcomer meets it (issue #19's friction list), through the real command:
--model defaults to the bundled model, a tiny data set sizes the run itself, a missing --data
file is one line before anything loads, a run that fails before its first step leaves no run
directory, and Ctrl-C saves a checkpoint and prints the command that resumes it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import corpus

from kaki.cli import main
from kaki.paths import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[1]


def kaki(*argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaki", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def write_data(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_model_defaults_to_the_bundled_one_then_kaki_model(family_dirs, monkeypatch, capsys):
    """--dry-run reads only config.json: the table is the bundled model's, or $KAKI_MODEL's."""
    env = {k: v for k, v in os.environ.items() if k != "KAKI_MODEL"}
    r = subprocess.run([sys.executable, "-m", "kaki", "train", "--dry-run", "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert f"seq {min(1024, cfg['max_position_embeddings'])} x batch 8" in r.stdout
    monkeypatch.setenv("KAKI_MODEL", str(family_dirs["persimmon"][1]))
    assert main(["train", "--dry-run", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert table != r.stdout and "parameters" in table


def test_a_tiny_data_set_sizes_the_run_and_says_so(tmp_path, family_dirs):
    """One short document: the sequence is as long as the data (less the final target), the batch
    is one, and the log says both were chosen from the data. No --model: $KAKI_MODEL is used."""
    base = family_dirs["persimmon"][1]
    context = json.loads((base / "config.json").read_text())["max_position_embeddings"]
    data = write_data(tmp_path / "one.jsonl", [" ".join(corpus(2, seed=2))])
    out = tmp_path / "run"
    r = kaki("train", "--data", data, "--out", out, "--max-steps", "1", "--no-progress", "--eval-fraction", "0",
             env={"KAKI_MODEL": str(base)})
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "train_options.json").read_text())
    assert saved["model"] == str(base)
    tokens = int(next(line for line in (out / "train.log").read_text().splitlines()
                      if f"{data}: 1 documents" in line).split(", ")[1].split()[0].replace(",", ""))
    assert 8 < tokens <= min(1024, context)  # the document is shorter than the default sequence
    assert (saved["seq_len"], saved["batch_size"]) == (tokens - 1, 1)
    assert f"--seq-len {tokens - 1} and --batch-size 1 chosen from the data" in r.stderr
    assert f"1 steps of 1 x {tokens - 1} tokens" in r.stderr


def test_missing_data_is_one_line_before_loading_and_leaves_no_run_directory(tmp_path):
    out = tmp_path / "run"
    # The model does not exist either: the data is checked first, before any model is read.
    r = kaki("train", "--model", tmp_path / "no-model", "--data", tmp_path / "nothere.jsonl", "--out", out)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"kaki train: error: --data {tmp_path / 'nothere.jsonl'} does not exist"]
    assert not out.exists()


def test_a_run_failing_before_its_first_step_removes_its_run_directory(tmp_path, family_dirs):
    base = family_dirs["persimmon"][1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    out = tmp_path / "run"
    r = kaki("train", "--model", base, "--data", bad, "--out", out, "--no-progress")
    assert r.returncode == 2 and "holds no usable records" in r.stderr
    assert not out.exists()
    # A directory that was there before the run is the user's: it stays, with what it held.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--model", str(base), "--data", str(bad), "--out", str(out), "--no-progress"]) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, family_dirs):
    base = family_dirs["persimmon"][1]
    data = write_data(tmp_path / "d.jsonl", [" ".join(corpus(8, seed=i)) for i in range(20)])
    out = tmp_path / "run"
    argv = ["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "100000",
            "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-m", "kaki", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().strip()):  # the first step is done
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    steps = sorted((out / "checkpoints").iterdir())
    assert len(steps) == 1 and steps[0].name.startswith("step-")
    step = int(steps[0].name.split("-")[1])
    assert step >= 1 and (steps[0] / "trainer_state.json").is_file()
    hint = err[err.index("Resume with:"):].splitlines()[1].strip()
    command = shlex.split(hint)
    assert command[:2] == ["kaki", "train"] and "--resume" in command and str(out) in command
    # The printed command resumes the run (one more step here, on the same schedule).
    r = kaki(*command[1:], "--stop-at-step", step + 1)
    assert r.returncode == 0, r.stderr
    assert f"at step {step}" in r.stderr and f"resumed from {steps[0]}" in r.stderr
    assert (out / "checkpoints" / f"step-{step + 1:08d}").is_dir()
