"""Training data: tokenizer training, loss masks (checked token by token), packing, mixing,
resumable data position, bad lines with file:line, YAML options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import corpus

from kaki.chat_format import get_format
from kaki.errors import KakiError
from kaki.tokenizer import Tokenizer
from kaki.train.data import (BadLines, Mixture, PackedFile, build_dataset, collate, parse_data_arg,
                             read_records, tokenize_record)
from kaki.train.options import from_sources

ADEPT = get_format("adept")


@pytest.fixture(scope="module")
def tok(spm_dir):
    return Tokenizer.from_dir(spm_dir)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def trained_text(tok, doc) -> str:
    """The text of the trained tokens, EOS shown as <EOS>."""
    ids = [int(i) for i, t in zip(doc.ids, doc.train) if t]
    eos = ids and ids[-1] == tok.eos_ids[0]
    return tok.decode(ids[:-1] if eos else ids) + ("<EOS>" if eos else "")


def test_train_tokenizer_cli_roundtrips_whitespace_and_bytes(tmp_path):
    from kaki.cli import main

    src = tmp_path / "docs.txt"
    src.write_text("\n\n".join(corpus(300)) + "\n\ndef f(x):\n    return x  # two  spaces\n")
    assert main(["train-tokenizer", str(src), "--vocab-size", "400", "--out", str(tmp_path / "tok")]) == 0
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)
    assert tok.id_to_piece(0) == "<unk>"
    text = "human: hi\n\nadept:   indented\n\tcode 😀 ünïcödé 12345"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert 0 not in ids  # byte fallback: nothing becomes <unk>
    # One |ENDOFTEXT|-style token for both BOS and EOS, as Persimmon has.
    assert main(["train-tokenizer", str(src), "--vocab-size", "400", "--out", str(tmp_path / "t2"),
                 "--bos-token", "|ENDOFTEXT|", "--eos-token", "|ENDOFTEXT|"]) == 0
    t2 = Tokenizer.from_dir(tmp_path / "t2")
    assert t2.bos_id == t2.eos_ids[0] == 1 and t2.id_to_piece(1) == "|ENDOFTEXT|"


def test_messages_mask_covers_only_replies_and_final_eos(tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "what is the time"},
                        {"role": "assistant", "content": "it is late"},
                        {"role": "user", "content": "and now"},
                        {"role": "assistant", "content": "later still"}]}
    doc = tokenize_record(rec, tok, tok.eos_ids[0], False, False, ADEPT)
    text = tok.decode(doc.ids.tolist())
    assert text == "Be brief.\n\nhuman: what is the time\n\nadept: it is late\n\nhuman: and now\n\nadept: later still"
    assert doc.ids[0] == tok.bos_id and not doc.train[0]
    assert doc.ids[-1] == tok.eos_ids[0] and doc.train[-1]
    # The runs of trained tokens are exactly the two replies (with the space after "adept:"),
    # the last one followed by EOS; nothing of the system text or the human turns.
    runs, cur = [], []
    for i, t in zip(doc.ids.tolist(), doc.train.tolist()):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert runs[-1][-1] == tok.eos_ids[0]
    # Pieces, not decode(): sentencepiece's decode drops a leading space.
    surface = ["".join(tok.id_to_piece(i) for i in r).replace("\u2581", " ") for r in runs]
    assert surface == [" it is late", " later still</s>"]
    # --train-on-prompt trains everything after BOS.
    full = tokenize_record(rec, tok, tok.eos_ids[0], False, True, ADEPT)
    assert full.train[1:].all() and not full.train[0]
    assert (full.ids == doc.ids).all()


def test_text_mask_prompt_trains_oig_replies_only(tok):
    rec = {"text": "<human>: what is the time\n<bot>: it is late\n<human>: and now\n<bot>: later still"}
    masked = tokenize_record(rec, tok, tok.eos_ids[0], True, False, ADEPT)
    got = trained_text(tok, masked)
    assert got.replace("\n", " ").split() == "it is late later still<EOS>".split()
    plain = tokenize_record(rec, tok, tok.eos_ids[0], False, False, ADEPT)
    assert plain.train[1:].all()  # text records train every token by default


def test_collate_shifts_and_ignores_untrained_targets(tok):
    ids = np.array([1, 5, 6, 7, 2], dtype=np.int32)
    train = np.array([False, False, True, True, True])
    inputs, targets = collate([(ids, train)], pad_id=0)
    assert inputs.tolist() == [[1, 5, 6, 7]]
    assert targets.tolist() == [[-100, 6, 7, 2]]


def test_packing_windows_cover_the_stream_with_eos_between_documents(tok):
    docs = [tokenize_record({"text": t}, tok, 2, False, False) for t in corpus(40)]
    f = PackedFile("x", docs, seq_len=16, seed=0, index=0)
    stream = np.concatenate([w[0][:-1] for w in (f.window(0, k) for k in range(f.windows))])
    assert f.windows == (f.tokens - 1) // 16
    assert all(len(f.window(0, k)[0]) == 17 for k in range(f.windows))
    # Consecutive windows overlap by one token, so every target is some window's target.
    assert all(f.window(0, k)[0][-1] == f.window(0, k + 1)[0][0] for k in range(f.windows - 1))
    assert (stream == 2).sum() >= len(docs) - 2  # EOS after every document (but a dropped tail)
    # Another epoch is another document order over the same tokens.
    e1 = np.concatenate([f.window(1, k)[0][:-1] for k in range(f.windows)])
    assert not (e1 == stream).all()
    whole = np.concatenate([d.ids for d in docs])
    f.window(1, 0)
    assert sorted(f._ids.tolist()) == sorted(whole.tolist())


def test_mixture_follows_weights_and_resumes_exactly(tok):
    docs = [tokenize_record({"text": t}, tok, 2, False, False) for t in corpus(60)]
    files = [PackedFile("a", docs[:30], 8, 0, 0), PackedFile("b", docs[30:], 8, 0, 1)]
    m = Mixture(files, [3.0, 1.0], seed=0)
    picks = []
    for _ in range(400):
        a_cursor = m.cursors[0][1] + m.cursors[0][0] * files[0].windows
        m.draw()
        picks.append(m.cursors[0][1] + m.cursors[0][0] * files[0].windows != a_cursor)
    share = sum(picks) / len(picks)
    assert 0.68 < share < 0.82, share  # weight 3:1 -> 75% from file a
    state = json.loads(json.dumps(m.state()))
    ahead = [m.draw()[0].tolist() for _ in range(20)]
    m2 = Mixture(files, [3.0, 1.0], seed=0)
    m2.load_state(state)
    assert [m2.draw()[0].tolist() for _ in range(20)] == ahead


def test_bad_lines_are_reported_with_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "good one"}, "{not json", {"txt": "wrong field"}, {"text": "   "},
        {"messages": [{"role": "user", "content": "q"}]}, {"messages": [{"role": "robot", "content": "x"}]},
        [1, 2], {"text": 5}, {"text": "good two"}])
    bad = BadLines()
    recs = read_records(path, bad, strict=False)
    assert [n for n, _ in recs] == [1, 9]
    assert bad.count == 7
    assert [b.split(":")[1] for b in bad.items] == ["2", "3", "4", "5", "6", "7", "8"]
    assert all(b.startswith(f"{path}:") for b in bad.items)
    assert "invalid JSON" in bad.items[0] and "neither `text` nor `messages`" in bad.items[1]
    assert "empty `text`" in bad.items[2] and "assistant" in bad.items[3]
    with pytest.raises(KakiError, match=rf"{path}:2: invalid JSON"):
        read_records(path, BadLines(), strict=True)
    logged = []
    ds = build_dataset(parse_data_arg(str(path)), tok, 2, 2, 0, eval_fraction=0, log=logged.append)
    assert ds.bad.count == 7 and any("skipped 7 bad data line" in m for m in logged)


def test_data_arg_weights_and_eval_split(tmp_path, tok):
    specs = parse_data_arg("a.jsonl:0.5,dir/b.jsonl,c:d.jsonl:2")
    assert [(str(s.path), s.weight) for s in specs] == [("a.jsonl", 0.5), ("dir/b.jsonl", 1.0), ("c:d.jsonl", 2.0)]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in corpus(100)])
    ds = build_dataset(parse_data_arg(str(path)), tok, 2, 16, 0, eval_fraction=0.1, log=lambda m: None)
    assert (ds.train_docs, ds.eval_docs) == (90, 10)
    assert ds.eval and all(len(w) <= 17 for w, _ in ds.eval)


def test_yaml_config_keys_are_the_flags(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data: [a.jsonl:2, b.jsonl]\nseq-len: 64\nlr: 0.001\nlora: true\n")
    o = from_sources({"lr": 0.01}, str(cfg))
    assert (o.data, o.seq_len, o.lr, o.lora) == ("a.jsonl:2,b.jsonl", 64, 0.01, True)
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(KakiError, match="unknown key 'learning_rate'"):
        from_sources({}, str(cfg))


def test_surrogates_and_bad_utf8_are_bad_lines_at_their_own_line(tmp_path, tok):
    """A lone surrogate passes json.loads but no tokenizer; a bad byte breaks only its line. Both
    are skipped with file:line (or stop the run under --strict-data), wherever they are."""
    good = [json.dumps({"text": f"good line {i}"}) for i in range(600)]
    lines = list(good)
    lines[1] = '{"text": "a lone \\ud800 surrogate"}'
    lines[2] = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}'
    path = tmp_path / "d.jsonl"
    data = "\n".join(lines).encode() + b"\n"
    at = data.index(b"good line 499")  # past the first read buffer of a text-mode file
    path.write_bytes(data[:at] + b"\xff\xfe" + data[at:])
    logged = []
    ds = build_dataset(parse_data_arg(str(path)), tok, 2, 8, 0, eval_fraction=0, log=logged.append)
    assert ds.bad.count == 3 and ds.train_docs == 597
    assert [b.split(":")[1] for b in ds.bad.items] == ["2", "3", "500"]
    assert "lone surrogate (U+D800" in ds.bad.items[0] and "lone surrogate (U+DFFF" in ds.bad.items[1]
    assert "not UTF-8" in ds.bad.items[2]
    assert any("skipped 3 bad data line" in m for m in logged)
    with pytest.raises(KakiError, match=rf"bad data line {path}:2: `text` holds a lone surrogate"):
        build_dataset(parse_data_arg(str(path)), tok, 2, 8, 0, eval_fraction=0, strict=True, log=logged.append)
    lines[1], lines[2] = good[1], good[2]
    path.write_bytes(("\n".join(lines) + "\n").encode().replace(b"good line 499", b"\xffgood line 499"))
    with pytest.raises(KakiError, match=rf"bad data line {path}:500: not UTF-8"):
        build_dataset(parse_data_arg(str(path)), tok, 2, 8, 0, eval_fraction=0, strict=True, log=logged.append)


def test_a_file_of_only_bad_lines_says_which_and_why(tmp_path, tok):
    path = write_jsonl(tmp_path / "all-bad.jsonl", ["{not json", {"txt": "x"}, {"text": "\ud800"}, [1], {"text": 5}])
    with pytest.raises(KakiError) as e:
        build_dataset(parse_data_arg(str(path)), tok, 2, 8, 0, eval_fraction=0, log=lambda m: None)
    msg = str(e.value)
    assert f"{path}:1: invalid JSON" in msg and f"{path}:2: neither `text` nor `messages`" in msg
    assert f"{path}:3: `text` holds a lone surrogate" in msg and "and 2 more" in msg and "above" not in msg
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(KakiError, match="no records"):
        build_dataset(parse_data_arg(str(tmp_path / "blank.jsonl")), tok, 2, 8, 0, eval_fraction=0)
