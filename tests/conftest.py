"""Shared fixtures: a sentencepiece tokenizer trained once per session, and tiny model directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import (copy_tokenizer, hf_model_dir, make_hf_model, prefer_text_pieces,  # noqa: E402
                     train_sentencepiece, write_spm_tokenizer)


def pytest_report_header(config):
    """The machine the suite ran on, as `kaki info` names it: which int8 kernel build and small-M
    setting the kernel tests exercised here."""
    from kaki.cli.info import machine_line
    return machine_line()


# The files that take longest (a minute or more of one core each), run first: `make test` deals
# whole files to two xdist workers in collection order, so starting with the long ones keeps one
# worker from running a long file alone at the end. Order only; nothing is skipped.
SLOW_FIRST = ["test_demo_model.py", "test_demo_recipe.py", "test_quant_quality.py", "test_web_chat.py",
              "test_train_quantized.py", "test_retrieval.py", "test_moderation_chat.py", "test_tp_launch.py",
              "test_train_dist.py", "test_cli.py", "test_tensor_parallel.py", "test_train_friction.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept


@pytest.fixture(scope="session")
def spm_proto() -> bytes:
    return train_sentencepiece()


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory, spm_proto) -> Path:
    """A tokenizer-only directory: sentencepiece tokenizer.model + tokenizer_config.json (BOS on)."""
    return write_spm_tokenizer(tmp_path_factory.mktemp("spm"), spm_proto)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, spm_dir):
    """One default tiny model directory per family, shared by tests that only read it:
    {family: (hf_model, path)}."""
    out = {}
    for family in ("persimmon", "gpt_neox", "llama", "gptj"):
        out[family] = hf_model_dir(family, tmp_path_factory.mktemp(family), spm_dir)
    return out


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory, spm_dir, spm_proto):
    """A tiny Llama whose greedy output decodes to words (see prefer_text_pieces): for stop
    strings, streaming and the CLI. Returns (hf_model, path)."""
    model = make_hf_model("llama", seed=3)
    prefer_text_pieces(model, spm_proto)
    path = tmp_path_factory.mktemp("text-llama")
    model.save_pretrained(path)
    copy_tokenizer(spm_dir, path)
    return model, path
