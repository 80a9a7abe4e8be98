"""Adept release directories from someone else: a `model` dict built to make the key walk endless,
and stored `args` with the wrong types or impossible sizes, are refused quickly with a KakiError
(the CLI: one line, exit 2). Releases are written as test_adept writes them (torch.save of
Megatron's dict, read back through kaki's restricted unpickler)."""

from __future__ import annotations

import time

import pytest
import torch

import kaki
from kaki.errors import CheckpointError
from test_adept import hf_model, megatron_args, megatron_model_dict, vocab, write_release  # noqa: F401 (fixtures)
from test_untrusted_checkpoints import assert_one_line_error


def release_with_model(tmp_path, hf_model, vocab, extra) -> object:  # noqa: F811
    model_dict = megatron_model_dict(hf_model)
    model_dict["language_model"]["extra"] = extra
    return write_release(tmp_path / "r", hf_model, vocab, model_dict=model_dict)


def shared_tree(levels: int) -> dict:
    """A dict of `levels` levels whose two children are the same dict: a few hundred bytes of
    pickle, 2**levels paths for a walk that does not count what it visits."""
    node = {"weight": torch.zeros(1)}
    for _ in range(levels):
        node = {"a": node, "b": node}
    return node


def test_model_dict_of_shared_subtrees_is_refused_quickly(tmp_path, hf_model, vocab):  # noqa: F811
    d = release_with_model(tmp_path, hf_model, vocab, shared_tree(40))
    assert sum(f.stat().st_size for f in d.rglob("*.pt")) < 2**20
    assert_one_line_error(d, "model_optim_rng.pt", "nested")


def test_wide_shared_tree_within_the_depth_bound_is_refused_by_its_entry_count(tmp_path, hf_model, vocab):  # noqa: F811
    wide = {str(i): shared_tree(12) for i in range(40)}  # 15 levels, 40 x 12,288 entries
    d = release_with_model(tmp_path, hf_model, vocab, wide)
    t = time.monotonic()
    with pytest.raises(CheckpointError, match=r"model_optim_rng\.pt.*more than 100,000 entries"):
        kaki.load(d, dtype="float32", device="cpu")
    assert time.monotonic() - t < 10


def test_self_referencing_model_dict_is_refused_not_a_recursion_error(tmp_path, hf_model, vocab):  # noqa: F811
    loop: dict = {}
    loop["self"] = loop
    d = release_with_model(tmp_path, hf_model, vocab, loop)
    with pytest.raises(CheckpointError, match=r"model_optim_rng\.pt.*nested more than 16 levels"):
        kaki.load(d, dtype="float32", device="cpu")


@pytest.mark.parametrize("arg,value,pattern", [
    ("hidden_size", "64", "hidden_size must be a positive integer, not '64'"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, not 0"),
    ("num_layers", 2.0, "num_layers must be a positive integer, not 2.0"),
    ("num_layers", 1_000_000, "num_layers is 1,000,000, which implies"),
    ("ffn_hidden_size", -1, "ffn_hidden_size must be a positive integer"),
    ("kv_channels", "16", "kv_channels must be a positive integer"),
    ("rotary_pct", 2.0, "rotary_pct must be a number in (0, 1]"),
    ("rotary_emb_base", "25000", "rotary_emb_base must be a positive number"),
    ("layernorm_epsilon", 0.0, "layernorm_epsilon must be a positive number"),
    ("max_position_embeddings", True, "max_position_embeddings must be a positive integer"),
    ("qk_layernorm", ["weights_per_layer"], "qk_layernorm is ['weights_per_layer']"),
])
def test_stored_args_with_wrong_types_or_sizes_are_named(tmp_path, hf_model, vocab, arg, value, pattern):  # noqa: F811
    args = megatron_args(hf_model)
    setattr(args, arg, value)
    d = write_release(tmp_path / "r", hf_model, vocab, args=args)
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        kaki.load(d, dtype="float32", device="cpu")
    assert time.monotonic() - t < 10
    assert pattern in str(e.value) and "args" in str(e.value), str(e.value)


@pytest.mark.parametrize("version", ["three", [3.0]])
def test_checkpoint_version_that_is_not_a_number(tmp_path, hf_model, vocab, version):  # noqa: F811
    d = write_release(tmp_path / "r", hf_model, vocab)
    pt = next(d.rglob("model_optim_rng.pt"))
    from kaki.adept.unpickle import load_checkpoint_file, save_checkpoint_file
    state = load_checkpoint_file(pt)
    state["checkpoint_version"] = version
    save_checkpoint_file(state, pt.with_suffix(".new"))  # not over the file the tensors are mmapped from
    pt.with_suffix(".new").replace(pt)
    with pytest.raises(CheckpointError, match="checkpoint_version must be a number"):
        kaki.load(d, dtype="float32", device="cpu")


def test_cli_refuses_zero_heads_in_one_line(tmp_path, hf_model, vocab):  # noqa: F811
    args = megatron_args(hf_model)
    args.num_attention_heads = 0
    assert_one_line_error(write_release(tmp_path / "r", hf_model, vocab, args=args), "num_attention_heads")


def test_release_with_nan_weights_names_the_megatron_tensor(tmp_path, hf_model, vocab):  # noqa: F811
    model_dict = megatron_model_dict(hf_model)
    model_dict["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.weight"][0, 0] = float("nan")
    d = write_release(tmp_path / "r", hf_model, vocab, model_dict=model_dict)
    with pytest.raises(CheckpointError, match=r"language_model\.encoder\.layers\.1\.mlp\.dense_4h_to_h\.weight in "
                                              r".*model_optim_rng\.pt holds 1 NaN"):
        kaki.load(d, dtype="float32", device="cpu")
