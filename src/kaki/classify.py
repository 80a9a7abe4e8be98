"""Classifiers at the text edge: `load_classifier(dir)`, `.classify(texts)`, `.save(dir)`.

A classifier directory is a transformers `<Family>ForSequenceClassification` or
`...ForTokenClassification` checkpoint (config.json `architectures` says which; `id2label` names
the labels, `problem_type` picks softmax, sigmoid or the raw value). The model side lives in
`kaki.heads`; this module tokenizes, batches, turns logits into scores and writes directories back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from kaki.checkpoint import TensorSource, assign_weights, renamed_sources, tensor_sources, validate
from kaki.config import ModelConfig, read_config
from kaki.device import pick_device, pick_dtype
from kaki.errors import CheckpointError, KakiError
from kaki.heads import SEQUENCE, TOKEN, ClassifierModel, architecture, head_renames, task_of
from kaki.loading import resolve_model_path
from kaki.saving import save_model_dir
from kaki.tokenizer import Tokenizer

BATCH = 16  # texts per forward pass in classify()


class TokenPrediction(NamedTuple):
    text: str  # the token's span of the input text (with its leading space, if any)
    start: int  # character offsets into the input text
    end: int
    label: str
    score: float


def is_classifier_dir(path: str | os.PathLike) -> bool:
    """True when PATH/config.json's `architectures` names a sequence or token classifier."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and task_of(raw.get("architectures")) is not None


def labels_of(cfg: ModelConfig) -> list[str]:
    """Label names by id from config.json's id2label (transformers' default: LABEL_0, LABEL_1)."""
    id2label = cfg.extra.get("id2label")
    if id2label:
        try:
            by_id = {int(k): str(v) for k, v in id2label.items()}
        except (AttributeError, ValueError):
            raise CheckpointError("config.json id2label must map label ids (\"0\", \"1\", ...) to names") from None
        if sorted(by_id) != list(range(len(by_id))):
            raise CheckpointError(f"config.json id2label has ids {sorted(by_id)}; they must be 0..{len(by_id) - 1}")
        return [by_id[i] for i in range(len(by_id))]
    return [f"LABEL_{i}" for i in range(int(cfg.extra.get("num_labels", 2)))]


def classifier_config(cfg: ModelConfig, task: str, labels: list[str], problem_type: str | None,
                      pad_token_id: int | None = None) -> ModelConfig:
    """`cfg` as a classifier's config.json: architectures, id2label/label2id, problem_type."""
    extra = {k: v for k, v in cfg.extra.items() if k not in ("num_labels", "problem_type")}
    extra["architectures"] = [architecture(cfg.model_type, task)]
    extra["id2label"] = {str(i): name for i, name in enumerate(labels)}
    extra["label2id"] = {name: i for i, name in enumerate(labels)}
    if problem_type is not None:
        extra["problem_type"] = problem_type
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    return cfg.replace(extra=extra, pad_token_id=pad)


def output_kind(problem_type: str | None, num_labels: int) -> str:
    """How logits become scores: transformers' loss choice, with single-label the default when the
    label dtype (which decides it in training) is unknown."""
    if problem_type is None:
        return "regression" if num_labels == 1 else "single_label_classification"
    return problem_type


def scores_of(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Probabilities (softmax, or sigmoid per label for multi-label) or raw values, in fp32."""
    logits = logits.float()
    if kind == "multi_label_classification":
        return torch.sigmoid(logits)
    if kind == "regression":
        return logits
    return torch.softmax(logits, dim=-1)


@dataclass
class Classifier:
    model: ClassifierModel
    tokenizer: Tokenizer
    config: ModelConfig  # as config.json says it (labels and problem_type included)
    path: str | None = None

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def labels(self) -> list[str]:
        return labels_of(self.config)

    @property
    def problem_type(self) -> str | None:
        return self.config.extra.get("problem_type")

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise KakiError(f"texts must be strings, got {type(text).__name__}")
        # Longer texts keep their first max_length tokens, as transformers' truncation=True does.
        return self.tokenizer.encode(text)[:self.max_length]

    @torch.no_grad()
    def logits(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Head outputs per sequence: (num_labels,) for sequence tasks, (len, num_labels) for tokens.
        Batches are right-padded with config.pad_token_id (pooling finds the last non-pad token by
        that id); without one, sequence tasks run one at a time, as transformers requires."""
        pad = self.config.pad_token_id
        step = BATCH if pad is not None or self.task == TOKEN else 1
        pad = 0 if pad is None else pad
        out: list[torch.Tensor] = []
        dev = self.model.device
        for i in range(0, len(ids), step):
            chunk = ids[i:i + step]
            S = max(len(x) for x in chunk)
            batch = torch.full((len(chunk), S), pad, dtype=torch.long)
            valid = torch.zeros(len(chunk), S, dtype=torch.bool)
            for b, x in enumerate(chunk):
                batch[b, :len(x)] = torch.tensor(x, dtype=torch.long)
                valid[b, :len(x)] = True
            logits = self.model(batch.to(dev), valid.to(dev) if not bool(valid.all()) else None)
            out += [logits[b] if self.task == SEQUENCE else logits[b, :len(x)]
                    for b, x in enumerate(chunk)]
        return out

    def classify(self, texts: list[str] | str) -> list[list[tuple[str, float]]]:
        """Per text, every label with its score, best first: softmax probabilities (single-label),
        per-label sigmoid probabilities (multi-label) or the raw value (regression)."""
        if self.task != SEQUENCE:
            raise KakiError("this is a token classifier; use classify_tokens()")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        empty = [i for i, t in enumerate(texts) if isinstance(t, str) and not self.tokenizer.encode(t)]
        if empty:
            raise KakiError(f"text {empty[0]} is empty (no tokens to classify)")
        kind = output_kind(self.problem_type, self.model.num_labels)
        labels = self.labels
        results = []
        for logits in self.logits([self.encode(t) for t in texts]):
            scores = scores_of(logits, kind).tolist()
            results.append(sorted(zip(labels, scores), key=lambda x: -x[1]))
        return results

    def classify_tokens(self, texts: list[str] | str) -> list[list[TokenPrediction]]:
        """Per text, each token (BOS excluded) with its best label and that label's probability."""
        if self.task != TOKEN:
            raise KakiError("this is a sequence classifier; use classify()")
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = [token_spans(self.tokenizer, t) for t in texts]
        labels = self.labels
        results = []
        for (ids, spans), logits in zip(encoded, self.logits([ids for ids, _ in encoded])):
            probs = torch.softmax(logits.float(), dim=-1)
            best, best_id = probs.max(-1)
            text = texts[len(results)]
            row = [TokenPrediction(text[a:b], a, b, labels[int(j)], float(p))
                   for (a, b), p, j in zip(spans, best.tolist(), best_id.tolist()) if a is not None]
            results.append(row)
        return results

    def save(self, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
        """A transformers-loadable classifier directory (weights, config.json, tokenizer files),
        written atomically."""
        return save_classifier(self.model, self.config, out_dir, tokenizer_dir=self.path, dtype=dtype)


def token_spans(tok: Tokenizer, text: str) -> tuple[list[int], list[tuple[int | None, int | None]]]:
    """Token ids as encode() gives them, with each token's character span in `text` ((None, None)
    for the BOS). A token's span runs to where the next one starts."""
    if not isinstance(text, str):
        raise KakiError(f"texts must be strings, got {type(text).__name__}")
    ids, starts = tok.encode_with_starts(text)
    byte_to_char = {}
    pos = 0
    for i, ch in enumerate(text):
        byte_to_char[pos] = i
        pos += len(ch.encode())
    byte_to_char[pos] = len(text)
    chars = [byte_to_char.get(s, None) for s in starts]
    # A start inside a multi-byte character (byte-fallback pieces) belongs to that character.
    for k, s in enumerate(starts):
        while chars[k] is None and s > 0:
            s -= 1
            chars[k] = byte_to_char.get(s)
    spans = [(a, chars[k + 1] if k + 1 < len(chars) else len(text)) for k, a in enumerate(chars)]
    head = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    return head + ids, [(None, None)] * len(head) + spans


def save_classifier(model: ClassifierModel, cfg: ModelConfig, out_dir: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None) -> Path:
    return save_model_dir(model, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, config=cfg,
                          rename_key=head_renames(cfg.model_type, model.task, to_checkpoint=True))


def build_classifier(model_dir: Path, cfg: ModelConfig, task: str, num_labels: int, dtype: torch.dtype,
                     device: torch.device, new_head: bool = False, seed: int = 0) -> ClassifierModel:
    """The classifier stored in `model_dir`, or with new_head a causal LM's decoder (its lm_head
    dropped) under a freshly initialised head."""
    sources = renamed_sources(cfg, tensor_sources(model_dir))
    with torch.device("meta"):
        model = ClassifierModel(cfg, task, num_labels)
    if new_head:
        sources.pop("lm_head.weight", None)
        init = _new_head_tensors(model, cfg.initializer_range, seed)
        sources.update({k: TensorSource(tuple(t.shape), t.dtype, (lambda t=t: t), "new head")
                        for k, t in init.items()})
    else:
        rename = head_renames(cfg.model_type, task, to_checkpoint=False)
        sources = {rename(k): v for k, v in sources.items()}
    validate(model, sources, str(model_dir))
    assign_weights(model, sources, dtype, device)
    return model.eval()


def _new_head_tensors(model: ClassifierModel, std: float, seed: int) -> dict[str, torch.Tensor]:
    """transformers' init for a new head: N(0, initializer_range) weight, zero bias."""
    g = torch.Generator().manual_seed(seed)
    out = {"score.weight": torch.empty(tuple(model.score.weight.shape)).normal_(0.0, std, generator=g)}
    if model.score.bias is not None:
        out["score.bias"] = torch.zeros(model.num_labels)
    return out


def load_classifier(path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                    device: str = "auto") -> Classifier:
    """Load a sequence- or token-classification directory with its tokenizer."""
    model_dir = resolve_model_path(path)
    cfg = read_config(model_dir)
    task = task_of(cfg.extra.get("architectures"))
    if task is None:
        raise CheckpointError(
            f"{model_dir} is not a classifier: config.json architectures "
            f"{cfg.extra.get('architectures')} names no *ForSequenceClassification or "
            f"*ForTokenClassification; train one with `kaki train --task sequence-classification "
            f"--model {model_dir} ...`")
    labels = labels_of(cfg)
    dev = pick_device(device)
    model = build_classifier(model_dir, cfg, task, len(labels), pick_dtype(dtype, cfg, dev), dev)
    return Classifier(model, Tokenizer.from_dir(model_dir, cfg), cfg, str(model_dir))
