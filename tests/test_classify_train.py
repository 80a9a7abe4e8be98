"""`kaki train --task sequence-classification|token-classification` on tiny models: a separable
synthetic task is learned, the output loads in kaki and transformers alike, labels and problem
types come from the data, word labels align to subword tokens, and bad input is one clear error."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import _WORDS, hf_model_dir

from kaki.classify import load_classifier
from kaki.cli import main
from kaki.tokenizer import Tokenizer
from kaki.train.classify_data import align_word_labels

SEQ = "sequence-classification"
FAST = ["--no-progress", "--eval-every", "0", "--warmup-steps", "3", "--weight-decay", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def groups(spm_dir) -> dict[str, list[str]]:
    """Words the tokenizer keeps whole, in two disjoint groups: a text's class is its words' group."""
    tok = Tokenizer.from_dir(spm_dir)
    whole = [w for w in _WORDS if len(tok.encode(w, add_bos=False)) == 1]
    assert len(whole) >= 6
    return {"animal": whole[0::2], "plant": whole[1::2]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, spm_dir) -> dict:
    """Tiny random causal LMs with transformers' usual init scale (0.02), which fine-tune smoothly."""
    return {f: hf_model_dir(f, tmp_path_factory.mktemp(f"base-{f}"), spm_dir, initializer_range=0.02)[1]
            for f in ("llama", "gpt_neox", "persimmon")}


def sentences(groups, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = "animal" if i % 2 else "plant"
        out.append((" ".join(rng.choice(groups[label]) for _ in range(rng.randint(3, 7))), label))
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_train(task: str, base, data: str, evals: str | None, out, steps: int, *extra: str) -> int:
    held = ["--eval-data", evals] if evals else ["--eval-fraction", "0.2"]
    return main(["train", "--task", task, "--model", str(base), "--data", data, *held, "--out", str(out),
                 "--max-steps", str(steps), *FAST, *extra])


def same_as_transformers(out, text: str) -> str:
    """Logits of kaki's and transformers' loads of `out` agree; returns transformers' class name."""
    import transformers as T

    clf = load_classifier(out, dtype="float32", device="cpu")
    auto = T.AutoModelForSequenceClassification if clf.task == SEQ else T.AutoModelForTokenClassification
    hf = auto.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([clf.tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(clf.model(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    return type(hf).__name__


def last_eval(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r][-1]


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory, groups):
    d = tmp_path_factory.mktemp("seq-data")
    train = write_jsonl(d / "train.jsonl", [{"text": t, "label": y} for t, y in sentences(groups, 192, 0)])
    held = sentences(groups, 40, 1)
    evals = write_jsonl(d / "eval.jsonl", [{"text": t, "label": y} for t, y in held])
    return train, evals, held


def test_sequence_classifier_learns_a_separable_task(tmp_path, bases, seq_data):
    train, evals, held = seq_data
    base = bases["llama"]
    out = tmp_path / "run"
    assert run_train(SEQ, base, train, evals, out, 30, "--batch-size", "16", "--lr", "1e-3") == 0
    ev = last_eval(out)
    assert ev["eval_accuracy"] >= 0.9 and ev["eval_f1"] >= 0.9, ev

    clf = load_classifier(out, dtype="float32", device="cpu")
    assert clf.labels == ["animal", "plant"] and clf.problem_type == "single_label_classification"
    results = clf.classify([t for t, _ in held])
    acc = sum(r[0][0] == y for r, (_, y) in zip(results, held)) / len(held)
    assert acc >= 0.9

    assert same_as_transformers(out, held[0][0]) == "LlamaForSequenceClassification"

    # Training on from the classifier keeps its labels and head.
    again = tmp_path / "again"
    assert run_train(SEQ, out, train, evals, again, 2, "--batch-size", "8", "--lr", "1e-4") == 0
    assert last_eval(again)["eval_accuracy"] >= 0.9
    assert load_classifier(again, device="cpu").labels == ["animal", "plant"]


def test_lora_classifier_trains_adapters_and_head_and_merges(tmp_path, bases, seq_data):
    train, evals, held = seq_data
    base = bases["gpt_neox"]
    out = tmp_path / "lora"
    assert run_train(SEQ, base, train, evals, out, 30, "--batch-size", "16", "--lr", "5e-3", "--lora",
                     "--lora-r", "4") == 0
    assert last_eval(out)["eval_accuracy"] >= 0.9
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForSequenceClassification"]
    assert not (out / "adapter_config.json").exists()  # merged into a plain classifier
    assert same_as_transformers(out, held[1][0]) == "GPTNeoXForSequenceClassification"


def test_token_classifier_learns_word_tags(tmp_path, bases, groups):
    rng = random.Random(0)
    tag = {**{w: "A" for w in groups["animal"]}, **{w: "P" for w in groups["plant"]}}
    vocab = list(tag) + [w for w in _WORDS[:40] if w not in tag]  # the rest: split words, tagged O

    def rows(n):
        out = []
        for _ in range(n):
            words = [rng.choice(vocab) for _ in range(rng.randint(3, 8))]
            out.append({"tokens": words, "labels": [tag.get(w, "O") for w in words]})
        return out

    train = write_jsonl(tmp_path / "train.jsonl", rows(160))
    evals = write_jsonl(tmp_path / "eval.jsonl", rows(30))
    base = bases["gpt_neox"]
    out = tmp_path / "tok"
    assert run_train("token-classification", base, train, evals, out, 40, "--batch-size", "16", "--lr", "3e-3") == 0
    ev = last_eval(out)
    assert ev["eval_accuracy"] >= 0.9, ev
    assert same_as_transformers(out, "the man and the state") == "GPTNeoXForTokenClassification"
    assert load_classifier(out, device="cpu").labels == ["A", "O", "P"]


def test_regression_and_multi_label_from_the_data(tmp_path, bases, groups):
    base = bases["persimmon"]
    reg = write_jsonl(tmp_path / "reg.jsonl", [{"text": t, "label": 0.5 if y == "animal" else -0.25}
                                               for t, y in sentences(groups, 40, 2)])
    out = tmp_path / "reg"
    assert run_train(SEQ, base, reg, None, out, 3, "--batch-size", "8") == 0
    assert "eval_mse" in last_eval(out)
    clf = load_classifier(out, device="cpu")
    assert clf.problem_type == "regression" and len(clf.classify(["the cat"])[0]) == 1

    multi = write_jsonl(tmp_path / "multi.jsonl", [{"text": t, "label": [y] + (["long"] if len(t) > 25 else [])}
                                                   for t, y in sentences(groups, 40, 3)])
    out = tmp_path / "multi"
    assert run_train(SEQ, base, multi, None, out, 3, "--batch-size", "8", "--labels", "plant,animal,long") == 0
    clf = load_classifier(out, device="cpu")
    assert clf.labels == ["plant", "animal", "long"]
    assert clf.problem_type == "multi_label_classification"
    scores = dict(clf.classify(["the cat"])[0])
    assert all(0 < s < 1 for s in scores.values()) and sum(scores.values()) != pytest.approx(1.0)


def test_word_labels_go_to_each_words_first_token(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    words = ["the", "unbelievably", "long", "xylophone", "!"]
    ids, targets = align_word_labels(tok, words, [10, 11, 12, 13, 14])
    assert ids == tok.encode(" ".join(words))
    assert targets[0] == -100  # BOS
    assert [t for t in targets if t != -100] == [10, 11, 12, 13, 14]
    assert len(ids) > len(words) + 1  # some words were split, and their continuations are -100
    text = " ".join(words)
    for w, label in zip(words, range(10, 15)):
        first = targets.index(label)
        assert w.startswith(tok.decode([ids[first]]).strip()[:1])


def test_bad_classification_data_is_one_clear_error(tmp_path, bases, capsys):
    base = bases["llama"]
    lm_data = write_jsonl(tmp_path / "lm.jsonl", [{"text": "no label here"}] * 4)
    args = ["train", "--task", "sequence-classification", "--model", str(base), "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main([*args, "--data", lm_data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable sequence-classification records" in err[0]
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"text": "a cat", "label": "x"}, {"text": "a dog", "label": "y"}])
    assert main([*args, "--data", unknown, "--labels", "x,z"]) == 2
    assert "'y' is not one of x, z" in capsys.readouterr().err
    assert main([*args, "--data", unknown, "--init-from-config", "c.json"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "nonsense", "--model", str(base)])
    assert e.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
