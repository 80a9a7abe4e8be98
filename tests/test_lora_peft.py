"""kaki's LoRA adapters and peft's are one format: checked against the real peft in both directions.

kaki trains with its own small LoRALinear (it wraps kaki's kernels.Linear and the one model), and
writes adapter_config.json + adapter_model.safetensors as peft does; peft's PeftModel must load
what kaki trained onto transformers' model and give kaki's logits, and kaki's `--adapter` must
load what peft saved.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from helpers import FAMILIES, hf_model_dir, write_chat_jsonl

import kaki
from kaki.cli import main
from kaki.lora import apply_adapter

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", 60, seed=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter_kaki_trained(family, tmp_path, spm_dir, chat_data):
    hf, base = hf_model_dir(family, tmp_path / "base", spm_dir)
    out = tmp_path / "lora"
    assert main(["train", "--model", str(base), "--data", str(chat_data), "--out", str(out), "--lora",
                 "--lora-r", "4", "--max-steps", "3", "--lr", "1e-2", "--seq-len", "32", "--batch-size", "2",
                 "--no-progress", "--eval-every", "0", "--save-every", "0"]) == 0
    ours = apply_adapter(kaki.load(base, dtype="float32", device="cpu"), out).model
    theirs = peft.PeftModel.from_pretrained(hf.float().eval(), out)
    with torch.no_grad():
        expect = theirs(IDS).logits
        plain = theirs.get_base_model()
        with theirs.disable_adapter():
            before = plain(IDS).logits
        torch.testing.assert_close(ours(IDS), expect, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, expect, atol=1e-4)  # the adapter changes the model


@pytest.mark.parametrize("family", FAMILIES)
def test_kaki_loads_the_adapter_peft_saved(family, tmp_path, spm_dir, capsys):
    hf, base = hf_model_dir(family, tmp_path / "base", spm_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(hf.float().eval(), cfg)  # random A and B: the adapter is not a no-op
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expect = model(IDS).logits
    ours = apply_adapter(kaki.load(base, dtype="float32", device="cpu"), tmp_path / "adapter").model
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), expect, rtol=1e-4, atol=1e-4)


def test_regex_targets_and_unsupported_options(tmp_path, spm_dir):
    hf, base = hf_model_dir("llama", tmp_path / "base", spm_dir)
    # A string target_modules is a regular expression over module names (peft's rule).
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|down_proj)", init_lora_weights=False)
    model = peft.get_peft_model(hf.float().eval(), cfg)
    model.save_pretrained(tmp_path / "regex")
    with torch.no_grad():
        expect = model(IDS).logits
    ours = apply_adapter(kaki.load(base, dtype="float32", device="cpu"), tmp_path / "regex").model
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if hasattr(m, "lora_A")})
    assert adapted == ["dense_4h_to_h", "q_proj"]  # kaki's names for down_proj and q_proj
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), expect, rtol=1e-4, atol=1e-4)
    # rsLoRA scales by alpha/sqrt(r): kaki refuses rather than computing alpha/r silently.
    hf2, _ = hf_model_dir("llama", tmp_path / "base2", spm_dir)
    rs = peft.get_peft_model(hf2.float(), peft.LoraConfig(r=2, target_modules="all-linear", use_rslora=True))
    rs.save_pretrained(tmp_path / "rslora")
    from kaki.errors import KakiError

    with pytest.raises(KakiError, match="use_rslora=True"):
        apply_adapter(kaki.load(base, dtype="float32", device="cpu"), tmp_path / "rslora")
