"""Tokenizers against their reference: sentencepiece itself for tokenizer.model, transformers'
AutoTokenizer for tokenizer.json; and the incremental detokenizer with stop strings."""

from __future__ import annotations

import json

import pytest

from kaki.tokenizer import TextStream, Tokenizer

from helpers import BOS, EOS, write_bpe_tokenizer, write_spm_tokenizer

# Edge cases that tokenizers disagree on: leading and doubled spaces, blank lines, characters the
# vocabulary never saw (emoji, CJK: byte fallback), accents, a special token's text, nothing.
TEXTS = [
    "Hello world",
    "The man said  two\n\nwords, then three.",
    " leading space",
    "日本語のテキスト",
    "emoji 😀 and 🎉🎉 together",
    "café naïve Ωmega",
    "mixed 中文 text 😀 with 한국어",
    "tab\tand\nnewline",
    "<s>the</s>",
    "",
]


@pytest.fixture(scope="module")
def spm_tok(spm_dir) -> Tokenizer:
    return Tokenizer.from_dir(spm_dir)


@pytest.fixture(scope="module")
def spm_ref(spm_dir):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))


# ----------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_is_used_when_only_tokenizer_model_exists(spm_tok):
    assert spm_tok.kind == "sentencepiece"
    assert spm_tok.bos_id == BOS and EOS in spm_tok.eos_ids and spm_tok.add_bos


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_ids_equal_sentencepiece_with_configured_bos(spm_tok, spm_ref, text):
    assert spm_tok.encode(text) == [BOS] + spm_ref.encode(text)
    assert spm_tok.encode(text, add_bos=False) == spm_ref.encode(text)


def test_sentencepiece_add_bos_token_false_is_honoured(tmp_path, spm_proto, spm_ref):
    tok = Tokenizer.from_dir(write_spm_tokenizer(tmp_path, spm_proto, add_bos=False))
    assert not tok.add_bos
    assert tok.encode("Hello world") == spm_ref.encode("Hello world")


@pytest.mark.parametrize("text", [t for t in TEXTS if not t.startswith(" ")])
def test_sentencepiece_round_trips_emoji_and_cjk(spm_tok, spm_ref, text):
    ids = spm_tok.encode(text)
    assert spm_tok.decode(ids) == text
    if any(ord(c) > 0x2FFF for c in text):
        # the characters really went through byte fallback (the trainer never saw them)
        assert any(spm_ref.is_byte(i) for i in ids[1:])


# ----------------------------------------------------------------------------- tokenizer.json

SPECIALS_BL = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
SPECIALS_MS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
JSON_CASES = {
    # Pythia: byte-level BPE, no BOS anywhere.
    "gpt_neox": ("bytelevel", {"tokenizer_class": "GPTNeoXTokenizer", "add_prefix_space": False, **SPECIALS_BL}, False),
    # Llama 3: BOS comes from tokenizer.json's post-processor, tokenizer_config says nothing.
    "llama3": ("bytelevel", {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS_BL}, True),
    # tokenizer.json's post-processor wins over tokenizer_config's add_bos_token, both ways
    # (transformers 5 drops add_bos_token when tokenizer.json exists).
    "metaspace-bos": ("metaspace", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                                    **SPECIALS_MS}, True),
    "metaspace-nobos": ("metaspace", {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
                                      **SPECIALS_MS}, False),
}


@pytest.fixture(scope="module", params=list(JSON_CASES))
def json_tok_dir(request, tmp_path_factory):
    style, cfg, bos_pp = JSON_CASES[request.param]
    return request.param, write_bpe_tokenizer(tmp_path_factory.mktemp(request.param), style, cfg, bos_pp)


def test_tokenizer_json_ids_equal_transformers(json_tok_dir):
    import transformers

    case, json_tok_dir = json_tok_dir
    ref = transformers.AutoTokenizer.from_pretrained(json_tok_dir)
    tok = Tokenizer.from_dir(json_tok_dir)
    assert tok.kind == "tokenizers"
    assert tok.add_bos == JSON_CASES[case][2]
    for text in TEXTS:
        ids = ref(text)["input_ids"]
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.bos_id == ref.bos_token_id
    assert ref.eos_token_id in tok.eos_ids


def test_tokenizer_json_wins_over_tokenizer_model(tmp_path, spm_proto):
    """Both files present: tokenizer.json is the truth."""
    d = write_bpe_tokenizer(tmp_path, *JSON_CASES["gpt_neox"])
    (d / "tokenizer.model").write_bytes(spm_proto)
    assert Tokenizer.from_dir(d).kind == "tokenizers"


# ----------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], stop=None, prompt=(BOS,)):
    ts = TextStream(tok, list(prompt), stop)
    pieces = [ts.push(i) for i in ids]
    pieces.append(ts.finish())
    return ts, pieces


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
@pytest.mark.parametrize("text", [t for t in TEXTS if t and not t.startswith(" ") and "<s>" not in t])
def test_stream_concatenates_to_full_decode(kind, text, spm_tok, tmp_path):
    tok = spm_tok if kind == "sentencepiece" else Tokenizer.from_dir(
        write_bpe_tokenizer(tmp_path, *JSON_CASES["metaspace-bos"]))
    ids = tok.encode(text, add_bos=False)
    ts, pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == ts.text == text
    # Never half a character: a piece is valid text on its own.
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_a_character_split_over_byte_tokens(spm_tok, spm_ref):
    ids = spm_tok.encode("a😀b", add_bos=False)
    emoji_bytes = [i for i in ids if spm_ref.is_byte(i)]
    assert len(emoji_bytes) == 4  # U+1F600 is four UTF-8 bytes, one byte piece each
    ts, pieces = _stream(spm_tok, ids)
    at = ids.index(emoji_bytes[0])
    assert pieces[at:at + 3] == ["", "", ""]  # nothing while the character is incomplete
    assert "😀" in pieces[at + 3]
    assert "".join(pieces) == "a😀b"


def test_ids_past_the_sentencepiece_vocabulary_decode_to_nothing(spm_tok, spm_ref):
    # A padded embedding (Adept's release pads to a multiple of 128) lets a model sample ids the
    # tokenizer has no piece for; decoding and streaming them must not raise.
    n = spm_ref.get_piece_size()
    ids = spm_tok.encode("hello world", add_bos=False)
    assert spm_tok.decode(ids[:1] + [n, n + 5] + ids[1:]) == spm_tok.decode(ids)
    assert spm_tok.id_to_piece(n) == ""
    _, pieces = _stream(spm_tok, ids + [n + 1])
    assert "".join(pieces) == spm_tok.decode(ids)


# ----------------------------------------------------------------------------- stop strings

STOP_TEXT = "The man said two words, then three more words."


@pytest.mark.parametrize("stop", ["said two", "n said t", "words,", "s, then th", "ee m"])
def test_stop_string_across_token_boundaries_is_caught_and_never_leaked(spm_tok, stop):
    ids = spm_tok.encode(STOP_TEXT, add_bos=False)
    pieces_of = [spm_tok.decode([i]) for i in ids]
    # the stop string really spans several tokens
    assert not any(stop in p for p in pieces_of)
    ts = TextStream(spm_tok, [BOS], [stop, "never there"])
    shown = ""
    expected = STOP_TEXT[:STOP_TEXT.index(stop)]
    for i in ids:
        shown += ts.push(i)
        assert expected.startswith(shown), "emitted text past the stop string's start"
        if ts.stopped:
            break
    assert ts.stopped
    shown += ts.finish()
    assert shown == ts.text == expected


def test_stop_string_prefix_is_held_then_released(spm_tok):
    """'said three' starts like 'said two': the held-back 'said t' must come out in the end."""
    ids = spm_tok.encode(STOP_TEXT, add_bos=False)
    ts, pieces = _stream(spm_tok, ids, stop=["said three"])
    assert not ts.stopped
    assert "".join(pieces) == ts.text == STOP_TEXT


def test_tokenizer_model_follows_sentencepiece_not_transformers_conversion(spm_dir, spm_tok, spm_ref):
    """With only tokenizer.model, sentencepiece is the truth. transformers 5 converts the Unigram
    model into its own tokenizer, which segments some text differently (here a leading space);
    kaki must side with sentencepiece there."""
    import transformers

    converted = transformers.AutoTokenizer.from_pretrained(spm_dir)
    text = " leading space"
    assert converted(text)["input_ids"] != [BOS] + spm_ref.encode(text)
    assert spm_tok.encode(text) == [BOS] + spm_ref.encode(text)


# ----------------------------------------------------------------------------- GPT-2 byte-level BPE

@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """vocab.json + merges.txt only, as GPT-J checkpoints without a tokenizer.json ship them."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. " * 3,
                             "def f(x):\n    return x + 1\n", "café naïve 😀 日本語"],
                            vocab_size=400, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(d))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    return d


@pytest.mark.parametrize("text", ["hello world", " leading space", "café 😀 日本語\n\tdef f(x):",
                                  "a<|endoftext|>b", "  two  spaces "])
def test_vocab_json_and_merges_equal_transformers_gpt2_tokenizer(bpe_dir, text):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    tok = Tokenizer.from_dir(bpe_dir)
    assert not (bpe_dir / "tokenizer.json").exists()
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert len(ids) > 1
    assert tok.decode(ids) == text.replace("<|endoftext|>", "")
    eot = ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_ids == [eot] and tok.bos_id == eot and not tok.add_bos


# ----------------------------------------------------------------------------- token offsets

def test_encode_with_starts_gives_transformers_offsets_in_bytes(json_tok_dir, spm_tok):
    """Where each token starts, in UTF-8 bytes: transformers' character offsets converted, for
    tokenizer.json; for sentencepiece, its own pieces' byte offsets (ids as `encode` gives them)."""
    import transformers

    _, json_tok_dir = json_tok_dir
    ref = transformers.AutoTokenizer.from_pretrained(json_tok_dir)
    tok = Tokenizer.from_dir(json_tok_dir)
    for text in TEXTS:
        enc = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        bytes_before = lambda c: len(text[:c].encode())  # noqa: E731
        assert tok.encode_with_starts(text) == (enc["input_ids"], [bytes_before(a) for a, _ in enc["offset_mapping"]])
    for text in TEXTS:
        ids, starts = spm_tok.encode_with_starts(text)
        assert ids == spm_tok.encode(text, add_bos=False)
        assert starts == sorted(starts) and all(0 <= s <= len(text.encode()) for s in starts)
    text = "naïve 日本"
    ids, starts = spm_tok.encode_with_starts(text)
    assert starts[-1] > len(text)  # bytes, not characters
