"""Classification heads against transformers' ForSequenceClassification / ForTokenClassification on
tiny random models: logits and losses with left and right padding for every problem_type, the
save round trip, and `kaki classify`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES, PAD, copy_tokenizer, hf_config

from kaki.classify import is_classifier_dir, load_classifier
from kaki.cli import main
from kaki.heads import SEQUENCE, TOKEN, classification_loss, pooled_positions

# transformers has no GPTJForTokenClassification to compare with, so GPT-J's token head is untested.
TOKEN_FAMILIES = [f for f in FAMILIES if f != "gptj"]

LABELS = ["neg", "neutral", "pos"]
PROMPTS = [[5, 17, 42, 99, 7, 3], [8, 250, 11], [61, 62, 63, 64, 65, 66, 67, 68]]


def hf_classifier(family: str, task: str, path=None, tokenizer_dir=None, seed: int = 0, **overrides):
    """A random transformers classifier with norms and biases perturbed (so a wrong layout shows),
    saved with a tokenizer when `path` is given."""
    import transformers as T

    torch.manual_seed(seed)
    overrides.setdefault("id2label", dict(enumerate(LABELS)))
    overrides.setdefault("label2id", {v: k for k, v in overrides["id2label"].items()})
    cfg = hf_config(family, **overrides)
    auto = T.AutoModelForSequenceClassification if task == SEQUENCE else T.AutoModelForTokenClassification
    model = auto.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias") or name.startswith(("score", "classifier")):
                p.copy_(0.3 * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(path)
        copy_tokenizer(tokenizer_dir, path)
    return model


def padded(side: str, prompts=PROMPTS):
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(S - len(p), S) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = torch.tensor(p), 1
    return ids, mask


def kaki_logits(clf, ids, mask):
    return clf.model(ids, mask.bool())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_logits_and_losses_match_transformers(tmp_path, spm_dir, family, side):
    hf = hf_classifier(family, SEQUENCE, tmp_path, spm_dir)
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    assert clf.task == SEQUENCE and clf.labels == LABELS
    ids, mask = padded(side)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    ours = kaki_logits(clf, ids, mask)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    # The pooled token is each row's last real token, whichever side the padding is on.
    assert pooled_positions(ids, PAD).tolist() == [int(m.nonzero().max()) for m in mask]

    g = torch.Generator().manual_seed(1)
    cases = {
        "single_label_classification": torch.tensor([2, 0, 1]),
        "multi_label_classification": torch.randint(0, 2, (3, 3), generator=g).float(),
        "regression": torch.randn(3, 3, generator=g),
    }
    for problem_type, labels in cases.items():
        hf.config.problem_type = problem_type
        want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = classification_loss(ours, labels, SEQUENCE, problem_type)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=problem_type)
    # problem_type unset: chosen from the labels' dtype, as transformers does.
    for labels in (cases["single_label_classification"], cases["multi_label_classification"]):
        hf.config.problem_type = None
        want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(classification_loss(ours, labels, SEQUENCE, None), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_output_regression_matches_transformers(tmp_path, spm_dir, family):
    hf = hf_classifier(family, SEQUENCE, tmp_path, spm_dir, id2label={0: "score"})
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    ids, mask = padded("right")
    labels = torch.tensor([0.5, -1.0, 2.0])
    out = hf(input_ids=ids, attention_mask=mask, labels=labels)
    ours = kaki_logits(clf, ids, mask)
    torch.testing.assert_close(ours, out.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(classification_loss(ours, labels, SEQUENCE, None), out.loss, atol=1e-5, rtol=1e-4)
    # classify() reports the raw value for regression
    [[(name, value)]] = clf.classify(["the cat"])
    ids1 = torch.tensor([clf.tokenizer.encode("the cat")])
    with torch.no_grad():
        want = float(hf(input_ids=ids1).logits[0, 0])
    assert name == "score" and value == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_token_logits_and_loss_match_transformers(tmp_path, spm_dir, family, side):
    hf = hf_classifier(family, TOKEN, tmp_path, spm_dir, classifier_dropout=0.25)
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    assert clf.task == TOKEN
    assert clf.model.dropout.p == hf.dropout.p == 0.25
    ids, mask = padded(side)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    ours = kaki_logits(clf, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-4)
    labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2)).masked_fill(~real, -100)
    want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(classification_loss(ours, labels, TOKEN, None), want, atol=1e-5, rtol=1e-4)


def test_token_head_name_and_dropout_follow_each_family(tmp_path, spm_dir):
    """GPT-NeoX calls its token head `classifier`; Persimmon falls back to hidden_dropout."""
    from safetensors import safe_open

    hf_classifier("gpt_neox", TOKEN, tmp_path / "neox", spm_dir)
    with safe_open(tmp_path / "neox" / "model.safetensors", "pt") as f:
        assert {"classifier.weight", "classifier.bias"} <= set(f.keys())
    load_classifier(tmp_path / "neox", device="cpu").save(tmp_path / "neox-out")
    with safe_open(tmp_path / "neox-out" / "model.safetensors", "pt") as f:
        assert {"classifier.weight", "classifier.bias"} <= set(f.keys())
    hf = hf_classifier("persimmon", TOKEN, tmp_path / "p", spm_dir, hidden_dropout=0.3)
    assert load_classifier(tmp_path / "p", device="cpu").model.dropout.p == hf.dropout.p == 0.3


@pytest.mark.parametrize("family,task", [(f, SEQUENCE) for f in FAMILIES] + [(f, TOKEN) for f in TOKEN_FAMILIES])
def test_save_round_trips_through_transformers(tmp_path, spm_dir, family, task):
    import transformers as T

    hf_classifier(family, task, tmp_path / "src", spm_dir, problem_type="single_label_classification")
    assert is_classifier_dir(tmp_path / "src")
    clf = load_classifier(tmp_path / "src", dtype="float32", device="cpu")
    clf.save(tmp_path / "out")
    auto = T.AutoModelForSequenceClassification if task == SEQUENCE else T.AutoModelForTokenClassification
    back = auto.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert cfg["problem_type"] == "single_label_classification"
    assert back.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    ids, mask = padded("right")
    ref = back(input_ids=ids, attention_mask=mask).logits
    ours = kaki_logits(clf, ids, mask)
    if task == TOKEN:
        ref, ours = ref[mask.bool()], ours[mask.bool()]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "out" / "tokenizer.model").is_file()


def test_classify_scores_batch_alike_and_sorted(tmp_path, spm_dir):
    hf = hf_classifier("llama", SEQUENCE, tmp_path, spm_dir)
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    texts = ["the cat sat on the mat", "a dog", "it was the best of times and the worst"]
    results = clf.classify(texts)
    for text, result in zip(texts, results):
        ids = torch.tensor([clf.tokenizer.encode(text)])
        probs = torch.softmax(hf(input_ids=ids).logits[0], -1)
        assert [s for _, s in result] == sorted((s for _, s in result), reverse=True)
        assert sum(s for _, s in result) == pytest.approx(1.0, abs=1e-5)
        for name, score in result:
            assert score == pytest.approx(float(probs[LABELS.index(name)]), abs=1e-5)


def test_multi_label_uses_sigmoid_and_no_pad_runs_one_by_one(tmp_path, spm_dir):
    hf = hf_classifier("gpt_neox", SEQUENCE, tmp_path, spm_dir, pad_token_id=None,
                       problem_type="multi_label_classification")
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    texts = ["the cat", "a much longer text about the dog and the cat"]
    for text, result in zip(texts, clf.classify(texts)):
        want = torch.sigmoid(hf(input_ids=torch.tensor([clf.tokenizer.encode(text)])).logits[0])
        assert dict(result) == pytest.approx({n: float(want[i]) for i, n in enumerate(LABELS)}, abs=1e-5)


def test_classify_tokens_spans_and_labels(tmp_path, spm_dir):
    hf = hf_classifier("persimmon", TOKEN, tmp_path, spm_dir)
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    text = "the cat sat"
    [preds] = clf.classify_tokens([text])
    ids = clf.tokenizer.encode(text)
    assert len(preds) == len(ids) - 1  # BOS has no span
    assert "".join(p.text for p in preds) == text
    probs = torch.softmax(hf(input_ids=torch.tensor([ids])).logits[0, 1:], -1)
    for p, row in zip(preds, probs):
        assert p.label == LABELS[int(row.argmax())] and p.score == pytest.approx(float(row.max()), abs=1e-5)


def test_not_a_classifier_is_a_clear_error(tmp_path, family_dirs, capsys):
    _, path = family_dirs["llama"]
    assert not is_classifier_dir(path)
    assert main(["classify", "--model", str(path), "hello"]) == 2
    err = capsys.readouterr().err
    assert "is not a classifier" in err and len(err.strip().splitlines()) == 1


def test_cli_prints_labels_and_json(tmp_path, spm_dir, capsys):
    hf_classifier("llama", SEQUENCE, tmp_path, spm_dir)
    clf = load_classifier(tmp_path, dtype="float32", device="cpu")
    want = clf.classify(["the cat", "a dog"])
    assert main(["classify", "--model", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--json",
                 "the cat", "a dog"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["the cat", "a dog"]
    for row, ref in zip(rows, want):
        assert [x["label"] for x in row["labels"]] == [n for n, _ in ref]
        assert [x["score"] for x in row["labels"]] == pytest.approx([s for _, s in ref], abs=1e-6)
    assert main(["classify", "--model", str(tmp_path), "--device", "cpu", "--top", "1", "the cat"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    top_label, top_score = want[0][0]
    assert len(out) == 1 and out[0].split() == [top_label, f"{top_score:.4f}"]
    assert main(["classify", "--model", str(tmp_path), "--top", "0", "x"]) == 2
    assert "--top" in capsys.readouterr().err


def test_cli_token_classifier(tmp_path, spm_dir, capsys):
    hf_classifier("gpt_neox", TOKEN, tmp_path, spm_dir)
    assert main(["classify", "--model", str(tmp_path), "--device", "cpu", "--json", "the cat"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(t["token"] for t in row["tokens"]) == "the cat"
    assert all(t["label"] in LABELS for t in row["tokens"])
