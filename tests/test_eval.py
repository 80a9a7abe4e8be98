"""`kaki eval` against independent computations: perplexity from transformers' logits on
sentencepiece's own tokens, and answer accuracy on replies produced by transformers' generate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kaki.cli import main
from kaki.evaluate import contains_match, exact_match, normalize_answer

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Python's json module encodes and decodes JSON.",
         "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_eval(capsys, *args) -> dict:
    assert main(["eval", "--dtype", "float32", "--device", "cpu", "--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def spm(model_dir: Path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(model_dir / "tokenizer.model"))
    return sp


@torch.no_grad()
def hf_token_nll(hf_model, ids: list[int]) -> torch.Tensor:
    """Negative log-likelihood of ids[1:] given the prefix, from transformers' logits."""
    logits = hf_model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


def test_text_perplexity_is_exp_of_mean_token_loss(family_dirs, tmp_path, capsys):
    hf_model, model_dir = family_dirs["persimmon"]
    sp = spm(model_dir)
    nll = torch.cat([hf_token_nll(hf_model, [sp.bos_id()] + sp.encode(t)) for t in TEXTS])
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    out = run_eval(capsys, "--model", model_dir, "--data", data, "--batch-size", 2)
    assert out["perplexity"]["tokens"] == nll.numel()
    assert out["perplexity"]["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert out["perplexity"]["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_chat_perplexity_scores_only_the_replies(family_dirs, tmp_path, capsys):
    hf_model, model_dir = family_dirs["persimmon"]
    sp = spm(model_dir)
    convs = [("What is json?", "A data format."), ("Hello there", "Hi! How can I help?")]
    nlls = []
    for q, a in convs:
        # Persimmon's format, written out here by hand: the reply is " {a}" after "adept:".
        text = f"human: {q}\n\nadept: {a}"
        start = text.index("adept:") + len("adept:")
        proto = sp.encode(text, return_type="proto")
        ids = [sp.bos_id()] + [p.id for p in proto.pieces]
        in_reply = [False] + [start <= p.begin for p in proto.pieces]  # ASCII: bytes == chars
        nll = hf_token_nll(hf_model, ids)
        nlls.append(nll[torch.tensor(in_reply[1:])])
    nll = torch.cat(nlls)
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": a}]}
                                              for q, a in convs])
    out = run_eval(capsys, "--model", model_dir, "--data", data)
    assert out["chat_format"] == "adept"
    assert out["perplexity"]["tokens"] == nll.numel()
    assert out["perplexity"]["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)


def test_long_text_is_windowed_and_every_token_scored_once(family_dirs, tmp_path, capsys):
    hf_model, model_dir = family_dirs["persimmon"]
    sp = spm(model_dir)
    ids = [sp.bos_id()] + sp.encode(TEXTS[2])
    L = 16
    assert len(ids) > 3 * L
    # Documented windowing: windows of L tokens, each starting on the previous window's last token,
    # which is then context only.
    nll = torch.cat([hf_token_nll(hf_model, ids[s:s + L]) for s in range(0, len(ids) - 1, L - 1)])
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[2]}])
    out = run_eval(capsys, "--model", model_dir, "--data", data, "--max-len", L)["perplexity"]
    assert out["tokens"] == nll.numel() == len(ids) - 1
    assert out["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)


# ----------------------------------------------------------------------------- answer accuracy

def test_answer_matching_on_known_strings():
    assert normalize_answer("The  JSON-module, of course!") == "jsonmodule of course"
    assert exact_match("  An iterator. ", "iterator")
    assert not exact_match("an iterator object", "iterator")
    assert contains_match("Use json.dumps() to serialize.", "JSON.DUMPS")
    assert not contains_match("Use pickle.", "json.dumps")
    assert not contains_match("anything", "  ")


@torch.no_grad()
def hf_greedy_reply(hf_model, sp, prompt: str, n: int) -> str:
    ids = [sp.bos_id()] + sp.encode(prompt)
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                            pad_token_id=0, eos_token_id=2)
    reply = sp.decode(out[0, len(ids):].tolist())
    cut = reply.find("\n\nhuman:")  # Persimmon's stop string
    return (reply if cut < 0 else reply[:cut]).strip()


def test_answer_accuracy_counts_exact_and_contains(text_model_dir, tmp_path, capsys):
    hf_model, model_dir = text_model_dir
    sp = spm(model_dir)
    n = 12
    q1, q2 = "Which module reads JSON?", "What does print do?"
    passage = {"title": "json (library/json)", "text": "The json module encodes and decodes JSON."}
    r1 = hf_greedy_reply(hf_model, sp, f"human: {q1}\n\nadept:", n)
    r2 = hf_greedy_reply(hf_model, sp, f"human: {q2}\n\nadept:", n)
    # With the passage: the context block, written out by hand.
    r1c = hf_greedy_reply(hf_model, sp, f"human: Context:\n[1] {passage['title']}\n{passage['text']}"
                                        f"\n\nQuestion: {q1}\n\nadept:", n)
    assert len(r1) > 4 and len(r2) > 4 and r1c != r1
    questions = [
        # exact (the reply itself) and contains (a piece of it)
        {"question": q1, "answer": r1, "key_phrase": r1[1:5], "passages": [passage]},
        # neither
        {"question": q2, "answer": "no such answer", "key_phrase": "zzqqzz", "passages": [passage]},
        # exact after normalization (case, punctuation); no key phrase: contains uses the answer
        {"question": q2, "answer": r2.upper() + " !?", "passages": [passage]},
    ]
    data = write_jsonl(tmp_path / "qa.jsonl", questions)
    out = run_eval(capsys, "--model", model_dir, "--data", data, "--chat-format", "adept",
                   "--max-new-tokens", n, "--show")
    wo = out["without_context"]
    assert [i["reply"] for i in wo["items"]] == [r1, r2, r2]
    assert wo["exact"] == pytest.approx(2 / 3) and wo["contains"] == pytest.approx(1 / 3)
    # With the passage in the prompt the replies are the ones transformers gives for that prompt.
    wc = out["with_context"]
    assert wc["items"][0]["reply"] == r1c
    assert wc["items"][0]["exact"] == (normalize_answer(r1c) == normalize_answer(r1))


def test_passage_ids_resolve_from_the_passages_file(text_model_dir, tmp_path, capsys):
    _, model_dir = text_model_dir
    write_jsonl(tmp_path / "passages.jsonl", [{"id": "p1", "title": "T", "text": "Some text."}])
    data = write_jsonl(tmp_path / "questions.jsonl",
                       [{"question": "Q?", "answer": "A", "key_phrase": "A", "passage_id": "p1"}])
    out = run_eval(capsys, "--model", model_dir, "--data", data, "--with-context", "--max-new-tokens", 4)
    assert set(out) >= {"with_context"} and "without_context" not in out
    write_jsonl(tmp_path / "passages.jsonl", [{"id": "other", "title": "T", "text": "x"}])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--with-context"]) == 2
    assert "passage id 'p1'" in capsys.readouterr().err


def test_bad_data_is_a_clear_error(text_model_dir, tmp_path, capsys):
    _, model_dir = text_model_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert "bad.jsonl:1 has none of `text`, `messages` or `question`" in capsys.readouterr().err


def test_retrieval_answers_with_the_retrieved_passages(text_model_dir, tmp_path, capsys):
    hf_model, model_dir = text_model_dir
    sp = spm(model_dir)
    n = 10
    passages = [
        {"id": "json", "title": "json", "text": "The json module encodes and decodes JSON documents."},
        {"id": "print", "title": "print", "text": "print writes objects to the text stream file."},
        {"id": "socket", "title": "socket", "text": "Low-level networking interface over sockets."},
    ]
    write_jsonl(tmp_path / "passages.jsonl", passages)
    assert main(["index", "build", str(tmp_path / "passages.jsonl"), "--out", str(tmp_path / "idx"),
                 "--no-chunk", "--embedder", "none"]) == 0
    capsys.readouterr()
    questions = [
        {"question": "Which module decodes JSON documents?", "answer": "json", "passage_id": "json"},
        {"question": "What writes objects to a text stream?", "answer": "print", "passage_id": "print"},
        # worded so BM25 ranks the json passage first: the gold one is missed
        {"question": "Is there a JSON networking module?", "answer": "socket", "passage_id": "socket"},
    ]
    data = write_jsonl(tmp_path / "questions.jsonl", questions)
    out = run_eval(capsys, "--model", model_dir, "--data", data, "--no-context", "--retrieval",
                   tmp_path / "idx", "--retrieval-k", 1, "--max-new-tokens", n, "--show",
                   "--chat-format", "adept")
    r = out["with_retrieval"]
    assert r["mode"] == "bm25" and r["k"] == 1
    assert r["gold_retrieved"] == pytest.approx(2 / 3)
    # Each reply is transformers' greedy reply to the prompt with the top hit's context block.
    for q, item, top in zip(questions, r["items"], ["json", "print", "json"]):
        p = next(p for p in passages if p["id"] == top)
        expect = hf_greedy_reply(hf_model, sp, f"human: Context:\n[1] {p['title']}\n{p['text']}"
                                               f"\n\nQuestion: {q['question']}\n\nadept:", n)
        assert item["reply"] == expect
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--retrieval",
                 str(tmp_path / "idx"), "--retrieval-k", "0"]) == 2
    assert "--retrieval-k" in capsys.readouterr().err
