"""`kaki convert`: Adept's release <-> transformers, both checked against transformers itself and
against the tensors that went in; `--trim-vocab` checked against the untrimmed model's generations."""

from __future__ import annotations

import json
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kaki
from kaki.cli import main
from kaki.errors import KakiError
from test_adept import (EOD, ITERATION, ROWS, TINY, hf_model, kaki_logits, make_model,  # noqa: F401 (fixtures)
                        never_produced, piece_ids, reference_logits, release, token_batch, train_adept_vocab,
                        vocab, write_release)

PROMPTS = ["The man said", "Where is the old state", "They came back, after all the years."]


def convert(*args: str | Path, capsys=None) -> tuple[str, str]:
    assert main(["convert", *map(str, args)]) == 0
    if capsys is None:
        return "", ""
    out = capsys.readouterr()
    return out.out, out.err


def release_file(d: Path) -> Path:
    return next(d.glob("iter_*/mp_rank_00/model_optim_rng.pt"))


def load_raw(d: Path) -> dict:
    from kaki.adept.unpickle import load_checkpoint_file
    return load_checkpoint_file(release_file(d))


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pickle_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def greedy(llm, prompts=PROMPTS, n=16) -> list:
    return llm.generate(list(prompts), temperature=0, max_new_tokens=n)


# ----------------------------------------------------------------------------- --to hf

def test_release_to_hf_loads_in_transformers_with_equal_logits(release, hf_model, tmp_path, capsys):
    import transformers

    out = tmp_path / "hf"
    with pytest.MonkeyPatch.context() as mp:  # a terminal: the progress bar over tensors is drawn
        mp.setattr(sys.stderr, "isatty", lambda: True)
        _, err = convert(release, out, "--to", "hf", capsys=capsys)
    assert "converting" in err
    model = transformers.PersimmonForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_batch(2)
    torch.testing.assert_close(reference_logits(model, ids), reference_logits(hf_model, ids), rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    eod = piece_ids((release / "adept_vocab.model").read_bytes()).piece_to_id(EOD)
    assert cfg["vocab_size"] == ROWS and cfg["max_position_embeddings"] == TINY["max_position_embeddings"]
    assert cfg["rope_theta"] == TINY["rope_theta"] and cfg["partial_rotary_factor"] == TINY["partial_rotary_factor"]
    assert cfg["layer_norm_eps"] == TINY["layer_norm_eps"] and cfg["hidden_act"] == "relu2"
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == eod and cfg["torch_dtype"] == "float32"
    assert (out / "tokenizer.model").read_bytes() == (release / "adept_vocab.model").read_bytes()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == tok_cfg["eos_token"] == EOD

    # kaki reads the directory back as the same model with the same tokenizer settings.
    a, b = kaki.load(release, dtype="float32", device="cpu"), kaki.load(out, dtype="float32", device="cpu")
    assert (b.tokenizer.bos_id, b.tokenizer.eos_ids, b.tokenizer.add_bos) == (eod, [eod], False)
    assert [c.token_ids for c in greedy(a)] == [c.token_ids for c in greedy(b)]


def test_dtype_and_sharding(release, hf_model, tmp_path):
    from kaki.adept.convert import read_source, write_transformers

    out = write_transformers(read_source(release), tmp_path / "bf16", torch.bfloat16, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    expected = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    seen = {}
    for f in files:
        with safe_open(out / f, framework="pt") as st:
            for k in st.keys():
                seen[k] = st.get_tensor(k)
    assert seen.keys() == expected.keys()
    for k, t in seen.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, expected[k]), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- --to adept

def test_release_round_trip_is_byte_equal(release, tmp_path):
    out = tmp_path / "again"
    convert(release, out, "--to", "adept", "--quiet")
    a, b = load_raw(release), load_raw(out)
    ta, tb = flat(a["model"]), flat(b["model"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        assert ta[k].contiguous().view(torch.uint8).equal(tb[k].contiguous().view(torch.uint8)), k
    assert b["iteration"] == ITERATION and b["checkpoint_version"] == a["checkpoint_version"]
    assert vars(b["args"]) == vars(a["args"])
    # The Megatron and adept classes are pickled under their own names again, for Megatron to read.
    names = pickle_globals(release_file(out))
    assert {"megatron.model.enums.ModelType", "megatron.model.enums.AttnMaskType",
            "tool_use.megatron.megatron_utils.ModelBackend", "argparse.Namespace"} <= names
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATION)
    assert (out / "adept_vocab.model").read_bytes() == (release / "adept_vocab.model").read_bytes()
    assert (out / "adept_vocab.vocab").read_text() == (release / "adept_vocab.vocab").read_text()


def test_transformers_to_adept_and_back(release, hf_model, tmp_path):
    """hf -> adept writes a release kaki loads with transformers' logits, and whose tensors (rotary
    buffers included, recomputed) equal the hand-built release's."""
    hf_dir = tmp_path / "hf"
    hf_model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes((release / "adept_vocab.model").read_bytes())
    out = tmp_path / "rel"
    convert(hf_dir, out, "--to", "adept", "--iteration", "7", "--quiet")
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    ids = token_batch(3)
    llm = kaki.load(out, dtype="float32", device="cpu")
    torch.testing.assert_close(kaki_logits(llm, ids), reference_logits(hf_model, ids), rtol=0, atol=2e-5)
    ta, tb = flat(load_raw(release)["model"]), flat(load_raw(out)["model"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    args = load_raw(out)["args"]
    assert (args.num_layers, args.hidden_size, args.rotary_pct, args.rotary_emb_base, args.padded_vocab_size) == (
        2, 64, TINY["partial_rotary_factor"], TINY["rope_theta"], ROWS)


def test_convert_bad_input(tmp_path, release, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(release), str(tmp_path / "o"), "--to", "hf", "--iteration", "3"]) == 2
    assert "--iteration only applies with --to adept" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- --trim-vocab

def test_trim_unused_block_at_the_top_truncates(release, tmp_path, capsys):
    """Reserved UNUSED pieces and Megatron's padding rows sit at the top: the matrices are cut, ids
    keep their numbers, the tokenizer loses only its trailing reserved pieces."""
    out = tmp_path / "trim"
    _, err = convert(release, out, "--to", "hf", "--trim-vocab", "--vocab-multiple", "8", "--quiet", capsys=capsys)
    sp = piece_ids((release / "adept_vocab.model").read_bytes())
    gone = never_produced(sp)
    assert gone == list(range(330, ROWS))  # precondition: one block at the top
    kept_rows = 336  # the 330 producible ids rounded up to a multiple of 8
    assert json.loads((out / "config.json").read_text())["vocab_size"] == kept_rows
    assert not (out / "vocab_map.json").exists()
    saved = (ROWS - kept_rows) * 64 * 4 * 2  # rows x hidden x fp32 bytes x (embedding + LM head)
    assert f"saved {saved:,} bytes" in err and "truncated" in err
    new_sp = piece_ids((out / "tokenizer.model").read_bytes())
    assert new_sp.get_piece_size() == kept_rows
    assert all(new_sp.id_to_piece(i) == sp.id_to_piece(i) for i in range(kept_rows))

    a, b = kaki.load(release, dtype="float32", device="cpu"), kaki.load(out, dtype="float32", device="cpu")
    ga, gb = greedy(a), greedy(b)
    assert all(i not in gone for c in ga for i in c.token_ids)  # precondition: ordinary output
    assert [c.token_ids for c in ga] == [c.token_ids for c in gb]
    assert [c.text for c in ga] == [c.text for c in gb]
    ids = token_batch(4)
    torch.testing.assert_close(kaki_logits(b, ids), kaki_logits(a, ids)[..., :kept_rows], rtol=0, atol=0)


@pytest.fixture(scope="module")
def scattered(tmp_path_factory):
    """A vocabulary with 40 control pieces (reserved image tokens) right after the special ones, so
    the unused ids are not one block at the top."""
    spm_bytes = train_adept_vocab(370, extra_control=[f"<img_{i}>" for i in range(40)])
    model = make_model(spm_bytes, seed=1)
    return write_release(tmp_path_factory.mktemp("scattered") / "rel", model, spm_bytes), model


@pytest.mark.parametrize("to", ["adept", "hf"])
def test_trim_scattered_ids_rewrites_the_tokenizer(scattered, tmp_path, capsys, to):
    import sentencepiece as spm

    release, model = scattered
    out = tmp_path / "trim"
    _, err = convert(release, out, "--to", to, "--trim-vocab", "--vocab-multiple", "8", "--quiet", capsys=capsys)
    assert "tokenizer rewritten" in err and "40 control pieces" in err
    old_sp = piece_ids((release / "adept_vocab.model").read_bytes())
    new_model = out / ("adept_vocab.model" if to == "adept" else "tokenizer.model")
    new_sp = spm.SentencePieceProcessor(model_file=str(new_model))
    ranges = json.loads((out / "vocab_map.json").read_text())
    kept = [i for a, b in ranges["kept_id_ranges"] for i in range(a, b)]
    assert ranges["original_vocab_size"] == ROWS
    assert not set(kept) & set(range(4, 44))  # the <img_i> pieces are gone
    assert all(new_sp.id_to_piece(i) == old_sp.id_to_piece(o) for i, o in enumerate(kept) if i < new_sp.get_piece_size())

    a, b = kaki.load(release, dtype="float32", device="cpu"), kaki.load(out, dtype="float32", device="cpu")
    assert b.config.vocab_size == len(kept) < ROWS
    assert b.tokenizer.eos_ids == [kept.index(a.tokenizer.eos_ids[0])]
    for text in PROMPTS:
        assert [kept[i] for i in b.tokenizer.encode(text)] == a.tokenizer.encode(text)
    ga, gb = greedy(a), greedy(b)
    assert [c.text for c in ga] == [c.text for c in gb]
    assert [c.token_ids for c in ga] == [[kept[i] for i in c.token_ids] for c in gb]
    ids = torch.tensor([a.tokenizer.encode(PROMPTS[2])])
    new_ids = torch.tensor([b.tokenizer.encode(PROMPTS[2])])
    torch.testing.assert_close(kaki_logits(b, new_ids), kaki_logits(a, ids)[..., kept], rtol=0, atol=0)

    # The id map travels with the model through further conversions.
    again = tmp_path / "again"
    convert(out, again, "--to", "hf" if to == "adept" else "adept", "--quiet")
    assert (again / "vocab_map.json").read_text() == (out / "vocab_map.json").read_text()
    assert [c.text for c in greedy(kaki.load(again, dtype="float32", device="cpu"))] == [c.text for c in ga]


def test_trim_from_transformers_to_transformers_loads_in_transformers(scattered, tmp_path):
    import transformers

    release, _ = scattered
    hf = tmp_path / "hf"
    convert(release, hf, "--to", "hf", "--quiet")
    out = tmp_path / "trim"
    convert(hf, out, "--to", "hf", "--trim-vocab", "--vocab-multiple", "16", "--quiet")
    model = transformers.PersimmonForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    kept = [i for a, b in json.loads((out / "vocab_map.json").read_text())["kept_id_ranges"] for i in range(a, b)]
    assert model.config.vocab_size == len(kept) == 336  # 330 producible ids, rounded up to 16
    full = transformers.PersimmonForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    llm = kaki.load(out, dtype="float32", device="cpu")
    new_ids = torch.tensor([llm.tokenizer.encode(PROMPTS[0])])
    old_ids = torch.tensor([[kept[i] for i in new_ids[0].tolist()]])
    torch.testing.assert_close(reference_logits(model, new_ids), reference_logits(full, old_ids)[..., kept],
                               rtol=0, atol=0)


def test_trim_needs_a_sentencepiece_tokenizer(tmp_path, hf_model):
    from kaki.adept.convert import read_source
    from kaki.adept.vocab_trim import trim_vocab

    d = tmp_path / "hf"
    hf_model.save_pretrained(d)
    (d / "tokenizer_config.json").write_text("{}")
    with pytest.raises(KakiError):
        trim_vocab(read_source(d))


def test_convert_draws_no_progress_bar_into_a_pipe(release, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kaki", "convert", str(release), str(tmp_path / "hf"), "--to", "hf"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "converting" not in r.stderr
    assert r.stdout.startswith("wrote ")
