"""Resumable training checkpoints that are also model directories.

OUT/checkpoints/step-00000100/ holds
- the model as a transformers directory (config.json, model.safetensors, tokenizer files), so
  `kaki generate --model` and `from_pretrained` load any checkpoint directly; for a LoRA run, the
  adapter (adapter_config.json + adapter_model.safetensors) instead;
- optimizer.safetensors: AdamW's moments and step per parameter, keyed by parameter name;
- rng.safetensors: torch's CPU (and CUDA) generator states;
- trainer_state.json: step, exact data position, tokens seen, the options of the run.

Each checkpoint is written into a hidden temporary directory and renamed into place
(kaki.checkpoint.write_atomically), so a kill mid-write leaves only a `.step-*.tmp-*` directory
that resume ignores and removes; a directory named step-N is always complete. Pruning renames
before deleting for the same reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from kaki.checkpoint import write_atomically
from kaki.errors import KakiError

CHECKPOINTS = "checkpoints"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
_NAME = re.compile(r"^step-(\d+)$")
FORMAT = 1


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def remove_partial(out: Path) -> None:
    """Leftovers of writes or deletions a kill interrupted (hidden temporary directories)."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer, named) -> dict:
    names = {p: n for n, p in named}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{names[p]}/{key}"] = value.detach().contiguous().cpu()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]],
                           tensors: dict[str, torch.Tensor], where: Path) -> None:
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, sub = key.rpartition("/")
        by_name.setdefault(name, {})[sub] = t
    missing = [n for n, _ in named if n not in by_name]
    if missing:
        raise KakiError(f"{where} has no optimizer state for {', '.join(missing[:5])}; the checkpoint "
                        "comes from a run with different trainable parameters (e.g. --lora)")
    for name, p in named:
        optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in by_name[name].items()}


def save_checkpoint(out: Path, step: int, write_model: Callable[[Path], None],
                    optim_tensors: dict[str, torch.Tensor], state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep_last`.
    optim_tensors: {"param name/state key": tensor} (optimizer_tensors)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s

    def write(tmp: Path) -> None:
        write_model(tmp)
        save_file(optim_tensors, tmp / OPTIMIZER)
        save_file(rng, tmp / RNG)
        (tmp / STATE).write_text(json.dumps({"format": FORMAT, "step": step, **state}, indent=2) + "\n")

    path = write_atomically(checkpoint_dir(out, step), write)
    prune(out, keep_last)
    return path


def prune(out: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, p in list_checkpoints(out)[:-keep_last]:
        doomed = p.with_name(f".{p.name}.deleting-{os.getpid()}")
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KakiError(f"{path / STATE} could not be read ({e})") from None
    if state.get("format") != FORMAT:
        raise KakiError(f"{path} was written by another kaki checkpoint format ({state.get('format')})")
    return state


def restore(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Set the RNG states from a checkpoint; return its trainer state and optimizer tensors."""
    state = read_state(path)
    tensors = load_file(path / OPTIMIZER)
    rng = load_file(path / RNG)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    return state, tensors


def publish_model(out: Path, write_model: Callable[[Path], None]) -> Path:
    """Put the final model's files at the top of OUT (next to checkpoints/ and the logs).

    The files are written into a hidden staging directory first, then moved in one by one with
    config.json last: OUT counts as holding a model only once config.json is there, and each
    file appears whole (os.replace)."""
    out = Path(out)
    stage = write_atomically(out / ".final-model", write_model)
    files = sorted(stage.iterdir(), key=lambda f: f.name == "config.json")
    for f in files:
        os.replace(f, out / f.name)
    stage.rmdir()
    return out
