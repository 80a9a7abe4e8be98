"""The recipe that built the bundled demo model still runs end to end (--smoke, on the committed
subset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_recipe_smoke_runs_end_to_end(tmp_path):
    env = dict(os.environ, KAKI_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "recipes" / "kaki-tiny.sh"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "work" / "kaki-tiny"
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["pretrain"]["steps"] == 4 and card["training"]["chat"]["steps"] == 3
    assert card["training"]["ground"]["steps"] == 2
    assert card["training"]["lookup"]["steps"] == 2 and card["training"]["user"]["steps"] == 2
    import kaki

    llm = kaki.load(out, dtype="float32", device="cpu")
    assert llm.config.torch_dtype == "bfloat16"
    assert llm.tokenizer.kind == "sentencepiece"
    text = llm.generate("human: What does len() return?\n\nadept:", max_new_tokens=5, temperature=0)[0]
    assert len(text.token_ids) >= 1
