"""Adept's Megatron release layout: kaki loads it with no Megatron code and no unsafe unpickling.

Nobody here has the 18 GB tarballs, so the tests build the layout themselves, as the reference
(adept-inference.md §2) describes it: a tiny random transformers Persimmon model is written under
Megatron's nested key names (the inverse of transformers' conversion script, §9), with per-layer
rotary inv_freq buffers, a pickled argparse.Namespace `args` holding enum members of classes from
`megatron.*` and `tool_use.*` modules (present in sys.modules only while writing, as on Adept's
machines, never while kaki reads), Megatron's rng_state, and a sentencepiece vocabulary trained
here with |ENDOFTEXT| as a control piece. kaki's logits are compared with transformers' on the
original model.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import os
import random
import shutil
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import kaki
from helpers import corpus, make_hf_model
from kaki.errors import KakiError

EOD = "|ENDOFTEXT|"
ROWS = 384  # embedding rows: the tokenizer's pieces padded up, as Megatron pads to a multiple of 128
TINY = dict(vocab_size=ROWS, partial_rotary_factor=0.25, rope_theta=10000.0, layer_norm_eps=1e-6,
            max_position_embeddings=200)  # not Persimmon's defaults: the config must come from args
ITERATION = 1251


# ----------------------------------------------------------------------------- Megatron's classes

class ModelType(enum.Enum):  # megatron.model.enums.ModelType
    encoder_or_decoder = 1
    encoder_and_decoder = 2


class AttnMaskType(enum.Enum):  # megatron.model.enums.AttnMaskType
    padding = 1
    causal = 2


class ModelBackend(enum.Enum):  # tool_use.megatron.megatron_utils.ModelBackend, adept's stub
    megatron = "megatron"


FAKE_MODULES = {"megatron.model.enums": [ModelType, AttnMaskType],
                "tool_use.megatron.megatron_utils": [ModelBackend]}


@contextlib.contextmanager
def megatron_importable():
    """Make the classes above pickle as Megatron's (module megatron.model.enums, ...) while a
    checkpoint is written; afterwards those modules are gone again, as on a user's machine."""
    added = []
    for module, classes in FAKE_MODULES.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        for cls in classes:
            cls.__module__ = module
            setattr(sys.modules[module], cls.__name__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]
        for classes in FAKE_MODULES.values():
            for cls in classes:
                cls.__module__ = __name__


# ----------------------------------------------------------------------------- the tokenizer

def train_adept_vocab(vocab_size: int, extra_control: list[str] = (), reserved: int = 0) -> bytes:
    """A Unigram model with byte fallback (as adept_vocab.model), |ENDOFTEXT| a control piece, and
    optionally `reserved` UNUSED pieces appended at the top (ids put aside, like Adept's)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=[EOD, *extra_control], num_threads=1, minloglevel=2)
    model = pb.ModelProto()
    model.ParseFromString(out.getvalue())
    for i in range(reserved):
        p = model.pieces.add()
        p.piece, p.score, p.type = f"<reserved_{i}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
    return model.SerializeToString()


def piece_ids(spm_bytes: bytes):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_proto=spm_bytes)


# ----------------------------------------------------------------------------- the release

def megatron_model_dict(hf_model, dtype=torch.float32) -> dict:
    """transformers' Persimmon state dict under Megatron's names and nesting (reference §2.3),
    i.e. undoing transformers' conversion script's renames (§9); no tensor is reshaped."""
    cfg = hf_model.config
    enc = OrderedDict()
    model = {"language_model": {"embedding": {"word_embeddings": {}}, "encoder": enc},
             "word_embeddings_for_head": {}}
    for k, v in hf_model.state_dict().items():
        v = v.detach().to(dtype).clone()
        if k == "model.embed_tokens.weight":
            model["language_model"]["embedding"]["word_embeddings"]["weight"] = v
        elif k == "lm_head.weight":
            model["word_embeddings_for_head"]["weight"] = v
        elif k.startswith("model.layers."):
            enc["layers." + k[len("model.layers."):].replace(".self_attn.", ".self_attention.")] = v
        elif k.startswith("model.final_layernorm."):
            enc[k[len("model."):]] = v
        else:
            raise AssertionError(f"unexpected transformers key {k}")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rot = int(head_dim * TINY["partial_rotary_factor"])
    inv_freq = 1.0 / (TINY["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    for i in range(cfg.num_hidden_layers):
        enc[f"layers.{i}.self_attention.rotary_emb.inv_freq"] = inv_freq.to(dtype)
    return model


def megatron_args(hf_model, dtype=torch.float32) -> argparse.Namespace:
    """The checkpoint-specific args of reference §2.4, with tiny values, plus Megatron/adept enums."""
    c = hf_model.config
    return argparse.Namespace(
        num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, kv_channels=c.hidden_size // c.num_attention_heads,
        seq_length=TINY["max_position_embeddings"], max_position_embeddings=TINY["max_position_embeddings"],
        pos_emb="rotary", rotary_pct=TINY["partial_rotary_factor"], rotary_emb_base=TINY["rope_theta"],
        layernorm_epsilon=TINY["layer_norm_eps"], untie_embeddings=True, sq_relu=True, bias_gelu_fusion=False,
        qk_layernorm="weights_per_layer", tokenizer_type="SentencePiece", padded_vocab_size=ROWS,
        bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, model_type=ModelType.encoder_or_decoder,
        attn_mask_type=AttnMaskType.causal, model_backend=ModelBackend.megatron, sp_model_file="adept_vocab.model")


def write_release(path: Path, hf_model, spm_bytes: bytes, model_dict=None, args=None,
                  iteration: int = ITERATION) -> Path:
    """Adept's release layout (reference §2.1-2.2), written as Megatron's save_checkpoint does."""
    path = Path(path)
    rank = path / f"iter_{iteration:07d}" / "mp_rank_00"
    rank.mkdir(parents=True)
    (path / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    (path / "adept_vocab.model").write_bytes(spm_bytes)
    sp = piece_ids(spm_bytes)
    (path / "adept_vocab.vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())))
    rng_state = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                  "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
    state = {"args": megatron_args(hf_model) if args is None else args, "checkpoint_version": 3.0,
             "iteration": iteration, "model": megatron_model_dict(hf_model) if model_dict is None else model_dict,
             "rng_state": rng_state}
    with megatron_importable():
        torch.save(state, rank / "model_optim_rng.pt")
    return path


def naive_qkv(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What a loader that took the fused rows as [all q; all k; all v] (a three-way chunk) would
    hand a head-interleaved model: q, k, v chunks re-laid per head."""
    q, k, v = w.chunk(3, dim=0)
    per_head = [t.reshape(heads, -1, *w.shape[1:]) for t in (q, k, v)]  # (H, D, ...)
    return torch.stack(per_head, dim=1).reshape(w.shape)  # (H, 3, D, ...) -> rows


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def vocab() -> bytes:
    return train_adept_vocab(330, reserved=20)


def never_produced(sp, rows: int = ROWS) -> list[int]:
    """Ids sentencepiece cannot produce and |ENDOFTEXT| is not: unused and control pieces, padding."""
    eod = sp.piece_to_id(EOD)
    return [i for i in range(rows) if i >= sp.get_piece_size()
            or (i != eod and (sp.is_unused(i) or (sp.is_control(i) and i > 2)))]


def make_model(spm_bytes: bytes, seed: int = 0):
    """A tiny random Persimmon whose LM-head rows for ids the tokenizer never produces score below
    the best real token (half of a real token's row), as a trained model's do: a random model
    would otherwise emit padding ids that no tokenizer can decode."""
    sp = piece_ids(spm_bytes)
    eod = sp.piece_to_id(EOD)
    model = make_hf_model("persimmon", seed=seed, bos_token_id=eod, eos_token_id=eod, pad_token_id=eod, **TINY)
    unused = never_produced(sp)
    real = [i for i in range(ROWS) if i not in set(unused) and i != eod]
    with torch.no_grad():
        w = model.lm_head.weight
        w[unused] = 0.5 * w[real[: len(unused)]]
    return model


@pytest.fixture(scope="module")
def hf_model(vocab):
    return make_model(vocab)


@pytest.fixture(scope="module")
def release(tmp_path_factory, hf_model, vocab) -> Path:
    return write_release(tmp_path_factory.mktemp("adept") / "8b_chat_model_release", hf_model, vocab)


def copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def token_batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 330, (2, 24), generator=g)


def reference_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def kaki_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(ids)


# ----------------------------------------------------------------------------- loading

def test_release_loads_with_logits_equal_to_transformers(release, hf_model, vocab):
    assert not any(m == "megatron" or m.startswith(("megatron.", "tool_use")) for m in sys.modules)
    llm = kaki.load(release, dtype="float32", device="cpu")
    ids = token_batch()
    torch.testing.assert_close(kaki_logits(llm, ids), reference_logits(hf_model, ids), rtol=0, atol=2e-5)

    # The config is the stored args', not Persimmon's defaults.
    cfg, hc = llm.config, hf_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.intermediate_size)
    assert cfg.vocab_size == ROWS
    assert cfg.max_position_embeddings == TINY["max_position_embeddings"]
    assert cfg.partial_rotary_factor == TINY["partial_rotary_factor"]
    assert cfg.rope_theta == TINY["rope_theta"]
    assert cfg.layer_norm_eps == TINY["layer_norm_eps"]
    assert cfg.hidden_act == "relu2" and cfg.qk_layernorm and not cfg.tie_word_embeddings

    # The tokenizer is adept_vocab.model itself, with |ENDOFTEXT| as BOS, EOS and pad; no BOS by
    # default, as Adept's server.
    sp = piece_ids(vocab)
    eod = sp.piece_to_id(EOD)
    assert llm.tokenizer.bos_id == eod and llm.tokenizer.eos_ids == [eod] and llm.tokenizer.pad_id == eod
    assert eod in llm.eos_ids
    text = "The man was there before all of them.\nNew day, same  state!"
    assert llm.tokenizer.encode(text) == sp.encode(text)
    assert llm.tokenizer.encode(text, add_bos=True) == [eod] + sp.encode(text)
    # Megatron's padding rows past the last piece decode to nothing (sentencepiece would raise).
    ids = sp.encode(text)
    assert llm.tokenizer.decode(ids[:3] + [ROWS - 1] + ids[3:]) == sp.decode(ids) == text


def test_generation_from_release_matches_transformers_greedy(release, hf_model):
    llm = kaki.load(release, dtype="float32", device="cpu")
    prompt = llm.tokenizer.encode("The people of the state said")
    out = llm.generate([prompt], temperature=0, max_new_tokens=12, ignore_eos=True)[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert out.token_ids == ref[0, len(prompt):].tolist()


def test_saving_a_loaded_release_writes_its_tokenizer_too(release, tmp_path):
    """LLM.save after kaki.load(release) gives a directory that loads on its own: the release's
    sentencepiece model and transformers' tokenizer files, not just weights and config."""
    llm = kaki.load(release, dtype="float32", device="cpu")
    out = llm.save(tmp_path / "saved")
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    again = kaki.load(out, dtype="float32", device="cpu")
    text = "The people of the state said"
    assert again.tokenizer.encode(text) == llm.tokenizer.encode(text)
    assert (again.tokenizer.bos_id, again.tokenizer.eos_ids) == (llm.tokenizer.bos_id, llm.tokenizer.eos_ids)
    ids = token_batch()
    assert torch.equal(kaki_logits(again, ids), kaki_logits(llm, ids))


def test_fused_qkv_is_head_interleaved_and_a_naive_chunk_fails(release, hf_model, tmp_path):
    """The release's fused qkv rows go to the model as they are (head-major, q/k/v interleaved
    per head, §2.6). A loader that split them with a three-way chunk gets different logits."""
    heads = hf_model.config.num_attention_heads
    model_dict = megatron_model_dict(hf_model)
    enc = model_dict["language_model"]["encoder"]
    for name in list(enc):
        if ".query_key_value." in name:
            enc[name] = naive_qkv(enc[name], heads)
    wrong = write_release(tmp_path / "naive", hf_model, (release / "adept_vocab.model").read_bytes(),
                          model_dict=model_dict)
    ids = token_batch(1)
    ref = reference_logits(hf_model, ids)
    right = kaki_logits(kaki.load(release, dtype="float32", device="cpu"), ids)
    naive = kaki_logits(kaki.load(wrong, dtype="float32", device="cpu"), ids)
    torch.testing.assert_close(right, ref, rtol=0, atol=2e-5)
    assert (naive - ref).abs().max() > 0.1

    # transformers' attention splits the stored rows the same way: its query is row h*3D + d of
    # each head's block, not the first third of the rows.
    enc = megatron_model_dict(hf_model)["language_model"]["encoder"]
    w, b = enc["layers.0.self_attention.query_key_value.weight"], enc["layers.0.self_attention.query_key_value.bias"]
    attn, seen = hf_model.model.layers[0].self_attn, {}
    hooks = [attn.query_key_value.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0])),
             attn.q_layernorm.register_forward_pre_hook(lambda m, a: seen.setdefault("q", a[0]))]
    reference_logits(hf_model, ids)
    for hook in hooks:
        hook.remove()
    B, S = ids.shape
    D = hf_model.config.hidden_size // heads
    fused = seen["x"] @ w.T + b  # (B, S, 3HD)
    torch.testing.assert_close(seen["q"], fused.view(B, S, heads, 3, D)[..., 0, :], rtol=0, atol=1e-5)
    assert (seen["q"] - fused.chunk(3, dim=-1)[0].reshape(B, S, heads, D)).abs().max() > 0.1


# ----------------------------------------------------------------------------- safe unpickling

class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused_and_never_runs(release, hf_model, vocab, tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = (_Exploit(os.system, f"touch {marker}") if kind == "os.system"
               else _Exploit(eval, f"open({str(marker)!r}, 'w').close()"))
    args = megatron_args(hf_model)
    args.model_type = payload  # hidden inside args, next to the genuine Megatron enums
    bad = write_release(tmp_path / "bad", hf_model, vocab, args=args)
    with pytest.raises(KakiError) as e:
        kaki.load(bad, dtype="float32", device="cpu")
    msg = str(e.value)
    assert "refusing to load" in msg and "model_optim_rng.pt" in msg
    assert ("system" in msg) if kind == "os.system" else ("eval" in msg)
    assert not marker.exists()


def test_malicious_global_inside_an_allowed_looking_name_is_inert(release, hf_model, vocab, tmp_path):
    """A class under megatron.* becomes a record: calling it runs nothing, whatever it is named."""
    from kaki.adept.unpickle import StandIn, load_checkpoint_file

    obj = load_checkpoint_file(next(release.glob("iter_*/mp_rank_00/model_optim_rng.pt")))
    assert isinstance(obj["args"].model_type, StandIn) and obj["args"].model_type.value == 1
    assert obj["args"].model_backend.value == "megatron"
    assert obj["args"].attn_mask_type.value == 2


# ----------------------------------------------------------------------------- bad input

def test_missing_tracker_file(release, tmp_path):
    d = copy_release(release, tmp_path / "r")
    (d / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(KakiError, match=r"no latest_checkpointed_iteration\.txt.*iter_0001251.*echo 1251"):
        kaki.load(d, device="cpu")


def test_tracker_names_a_missing_iteration(release, tmp_path):
    d = copy_release(release, tmp_path / "r")
    (d / "latest_checkpointed_iteration.txt").write_text("2000\n")
    with pytest.raises(KakiError, match=r"names iter_0002000.*does not exist \(found iter_0001251\)"):
        kaki.load(d, device="cpu")


def test_rank_folders_that_disagree_with_the_args_are_refused(release, tmp_path):
    # Tensor-parallel releases load (tests/test_tensor_parallel.py); a second rank folder that the
    # args do not announce is a mixed-up release, not a shard to join.
    d = copy_release(release, tmp_path / "r")
    it = d / "iter_0001251"
    shutil.copytree(it / "mp_rank_00", it / "mp_rank_01")
    with pytest.raises(KakiError, match=r"tensor_model_parallel_size is 1 but the iteration folder holds 2 "
                                        r"mp_rank_XX folder"):
        kaki.load(d, device="cpu")
    shutil.copytree(it / "mp_rank_00", it / "mp_rank_03")
    with pytest.raises(KakiError, match=r"holds mp_rank_00, mp_rank_01, mp_rank_03 but not mp_rank_02"):
        kaki.load(d, device="cpu")


def test_corrupted_checkpoint_file(release, tmp_path):
    d = copy_release(release, tmp_path / "r")
    pt = d / "iter_0001251" / "mp_rank_00" / "model_optim_rng.pt"
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 2])
    with pytest.raises(KakiError, match=r"model_optim_rng\.pt.*(corrupted|truncated).*extract it again"):
        kaki.load(d, device="cpu")


def test_args_that_disagree_with_the_weights(release, hf_model, vocab, tmp_path):
    args = megatron_args(hf_model)
    args.padded_vocab_size = 512
    d = write_release(tmp_path / "r", hf_model, vocab, args=args)
    with pytest.raises(KakiError, match=r"padded_vocab_size is 512 but the embedding has 384 rows"):
        kaki.load(d, device="cpu")


def test_missing_tensor_is_listed(release, hf_model, vocab, tmp_path):
    model_dict = megatron_model_dict(hf_model)
    del model_dict["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.weight"]
    d = write_release(tmp_path / "r", hf_model, vocab, model_dict=model_dict)
    with pytest.raises(KakiError, match=r"do not match its stored args: missing model\.layers\.1\.mlp\.dense_4h_to_h\.weight"):
        kaki.load(d, device="cpu")


# ----------------------------------------------------------------------------- kaki info

def test_info_on_a_release_prints_the_same_facts_plus_the_iteration(release, hf_model, tmp_path, capsys):
    from kaki.cli import main

    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes((release / "adept_vocab.model").read_bytes())
    assert main(["info", str(release), "--json"]) == 0
    import json
    rel = json.loads(capsys.readouterr().out)
    assert main(["info", str(hf_dir), "--json"]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert rel.pop("iteration") == ITERATION and rel.pop("layout") == "megatron-release"
    for key in ("path", "stored_dtype"):
        rel.pop(key), hf.pop(key)
    # The small-M choices are measured per loaded model; info reports them for a transformers
    # directory, not for a release it would have to unpickle whole (kaki info's machine part).
    assert rel.pop("small_m") is None and hf.pop("small_m")["dtype"] == "float32"
    assert rel == hf
    assert main(["info", str(release)]) == 0
    text = capsys.readouterr().out
    assert "iteration       1251" in text and "parameters" in text
