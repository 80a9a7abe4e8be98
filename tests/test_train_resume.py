"""Interrupted training: a run killed with SIGKILL (between checkpoints, or while writing one) and
resumed with --resume reaches bit-identical weights to an uninterrupted run (CPU, fp32)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import corpus, hf_model_dir

from kaki.cli import main

# Runs `kaki train` in a child process that SIGKILLs itself at a chosen point: after optimizer
# step N ("step N"), or in the middle of writing checkpoint N ("write N": the model file is on
# disk and the optimizer file half written when the process dies).
KILLER = r"""
import os, signal, sys
from pathlib import Path
from kaki.train import checkpointing, loop
from kaki.cli import main

mode, at = sys.argv[1], int(sys.argv[2])
if mode == "step":
    step = loop.Trainer.train_step
    def train_step(self):
        out = step(self)
        if self.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    loop.Trainer.train_step = train_step
else:
    save_file = checkpointing.save_file
    def half_then_die(tensors, path, *a, **k):
        path = Path(path)
        if path.name == checkpointing.OPTIMIZER and f"step-{at:08d}" in path.parent.name:
            save_file(tensors, path, *a, **k)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save_file(tensors, path, *a, **k)
    checkpointing.save_file = half_then_die
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_dir):
    root = tmp_path_factory.mktemp("resume")
    base = hf_model_dir("persimmon", root / "base", spm_dir)[1]
    data = root / "d.jsonl"
    lines = corpus(200, seed=3)
    data.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 4])}) + "\n" for i in range(0, 200, 4)))
    return root, base, data


def args(base, data, out) -> list[str]:
    return ["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "8",
            "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--save-every", "3",
            "--eval-every", "4", "--keep-last", "5", "--no-progress", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def reference(setup):
    root, base, data = setup
    out = root / "straight"
    assert main(args(base, data, out)) == 0
    return out


def kill_run(mode: str, at: int, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    p = subprocess.run([sys.executable, "-c", KILLER, mode, str(at), *argv], env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def losses(out: Path) -> list:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in rows]


@pytest.mark.parametrize("mode,at,resumes_from", [("step", 5, 3), ("write", 6, 3)])
def test_killed_run_resumes_bit_exactly(setup, reference, tmp_path, mode, at, resumes_from):
    _, base, data = setup
    out = tmp_path / "run"
    assert kill_run(mode, at, args(base, data, out)) == -signal.SIGKILL
    ckpts = out / "checkpoints"
    complete = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))
    assert complete == [f"step-{resumes_from:08d}"]
    if mode == "write":
        # The interrupted write left only a hidden temporary directory, never a step-6.
        assert any(p.name.startswith(".step-00000006.tmp-") for p in ckpts.iterdir())
    assert not (out / "model.safetensors").exists()
    assert main(args(base, data, out) + ["--resume"]) == 0
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # leftovers cleaned
    same_weights(reference, out)
    same_weights(reference / "checkpoints" / "step-00000006", out / "checkpoints" / "step-00000006")
    assert losses(out) == losses(reference)
    state = json.loads((out / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    ref_state = json.loads((reference / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["data"] == ref_state["data"] and state["step"] == 8


def test_stop_at_step_then_resume_equals_one_run(setup, reference, tmp_path):
    """--stop-at-step ends a run part-way through its schedule with a usable model; --resume
    finishes the same schedule with the same weights as one uninterrupted run."""
    _, base, data = setup
    out = tmp_path / "run"
    assert main(args(base, data, out) + ["--stop-at-step", "5"]) == 0
    state = json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["step"] == 5
    # The model published at the stop is the step-5 weights, on the 8-step schedule's learning rates.
    same_weights(out / "checkpoints" / "step-00000005", out)
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    ref = [r["lr"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs == ref[:5]
    assert main(args(base, data, out) + ["--resume"]) == 0
    same_weights(reference, out)
