"""Saved models honour the umask like any other file the user writes: under umask 022 a saved
model directory is 0755 and its files (weights included) 0644; under 077, 0700 and 0600. Every
saver goes through kaki.checkpoint.write_atomically (LLM.save, convert, quantize, merge-lora,
training's checkpoints and final model)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import kaki
from kaki.quant import as_spec
from kaki.quant.convert import write_quantized


def modes(root: Path) -> set[tuple[str, int]]:
    out = set()
    for p in [root, *root.rglob("*")]:
        out.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return out


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask,dirs,files", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o027, 0o750, 0o640)])
def test_saved_models_follow_the_umask(text_model_dir, tmp_path, umask, mask, dirs, files):
    umask(mask)
    llm = kaki.load(text_model_dir[1], dtype="float32", device="cpu")
    saved = llm.save(tmp_path / "saved")
    assert any(p.suffix == ".safetensors" for p in Path(saved).iterdir())
    assert modes(Path(saved)) == {("dir", dirs), ("file", files)}
    quantized = write_quantized(text_model_dir[1], tmp_path / "q", as_spec("int8", True))
    assert modes(Path(quantized)) == {("dir", dirs), ("file", files)}
