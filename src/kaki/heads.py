"""Sequence- and token-classification heads on kaki's one decoder, as transformers defines them.

A classifier is the causal LM's decoder without its lm_head, plus one linear `score`:
- sequence classification: `score` (no bias) on the final hidden state of the rightmost token that
  is not the pad id (left and right padding alike); with no pad id, the last position, batch 1 only;
- token classification: dropout (train mode only), then `score` (with bias) on every position.

Losses follow `problem_type` exactly as transformers computes them (`classification_loss`). The
checkpoint layout is transformers' `<Family>For{Sequence,Token}Classification`: the decoder under
the causal LM's own names, the head as `score.*` (`classifier.*` where a family's class says so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kaki.config import FAMILIES, ModelConfig
from kaki.kernels import Linear
from kaki.model import CausalLM

SEQUENCE, TOKEN = "sequence-classification", "token-classification"
TASKS = (SEQUENCE, TOKEN)
ARCH_SUFFIX = {SEQUENCE: "ForSequenceClassification", TOKEN: "ForTokenClassification"}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# The head's checkpoint name where a family's transformers class does not call it `score`
# (GPTNeoXForTokenClassification: `self.classifier`). Every other family and task: `score`.
HEAD_NAMES: dict[tuple[str, str], str] = {("gpt_neox", TOKEN): "classifier"}
HEAD = "score"  # kaki's name for the head module, whatever the checkpoint calls it


def architecture(model_type: str, task: str) -> str:
    """transformers' class name for `task` on a family: its causal LM's name with the suffix swapped."""
    return FAMILIES[model_type]["architecture"].removesuffix("ForCausalLM") + ARCH_SUFFIX[task]


def task_of(architectures) -> str | None:
    """The classification task a config.json `architectures` list names, or None (a causal LM)."""
    for arch in architectures or []:
        for task, suffix in ARCH_SUFFIX.items():
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    return None


def head_name(model_type: str, task: str) -> str:
    return HEAD_NAMES.get((model_type, task), HEAD)


def token_dropout(extra: dict) -> float:
    """transformers' rule: classifier_dropout, else hidden_dropout, else 0.1."""
    for key in ("classifier_dropout", "hidden_dropout"):
        if extra.get(key) is not None:
            return float(extra[key])
    return 0.1


class ClassifierModel(CausalLM):
    """The decoder (CausalLM's hidden_states) without lm_head, plus the `score` head.

    `config` has tie_word_embeddings off: a classifier has no output embedding to tie (transformers'
    classification classes have none either), and the checkpoint helpers read it from here."""

    def __init__(self, cfg: ModelConfig, task: str, num_labels: int):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        super().__init__(cfg.replace(tie_word_embeddings=False))
        del self.lm_head
        self.task, self.num_labels = task, num_labels
        bias = task == TOKEN and cfg.extra.get("token_classification_bias", True)
        self.score = Linear(cfg.hidden_size, num_labels, bias=bool(bias))
        self.dropout = nn.Dropout(token_dropout(cfg.extra) if task == TOKEN else 0.0)
        self.trained_whole = (HEAD,)  # LoRA training adapts the decoder; the head trains whole

    def forward(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence task: pooled logits (B, num_labels); token task: logits (B, S, num_labels).
        valid: (B, S) False on padding (the attention mask)."""
        h = self.hidden_states(input_ids, valid=valid)  # (B, S, H)
        if self.task == TOKEN:
            return self.score(self.dropout(h))
        last = pooled_positions(input_ids, self.config.pad_token_id)
        # Pooling before the head is the same product as transformers' head-then-pool, for 1/S the work.
        return self.score(h[torch.arange(h.shape[0], device=h.device), last])  # (B, num_labels)


def pooled_positions(input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(B,) index of the rightmost token that is not `pad_id`. transformers compares ids with the
    pad id (not the attention mask), so a batch must be padded with exactly config.pad_token_id."""
    B, S = input_ids.shape
    if pad_id is None:
        if B != 1:
            raise ValueError("a sequence classifier without pad_token_id in config.json can only take one "
                             "sequence at a time (transformers: 'Cannot handle batch sizes > 1 if no "
                             "padding token is defined'); set pad_token_id in config.json")
        return torch.full((1,), S - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(S, device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def resolve_problem_type(problem_type: str | None, num_labels: int, labels: torch.Tensor) -> str:
    """transformers' choice when config.json leaves problem_type unset."""
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, task: str, problem_type: str | None,
                        reduction: str = "mean") -> torch.Tensor:
    """The loss transformers computes for a head's output. reduction "sum" gives the summed loss
    (training normalises by `loss_count` over the whole global batch instead of per micro-batch)."""
    labels = labels.to(logits.device)
    if task == TOKEN:
        # Upcast as transformers does: a bf16 log-softmax loses digits.
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100,
                               reduction=reduction)
    num_labels = logits.shape[-1]
    kind = resolve_problem_type(problem_type, num_labels, labels)
    if kind == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype), reduction=reduction)
        return F.mse_loss(logits, labels.to(logits.dtype), reduction=reduction)
    if kind == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=-100,
                               reduction=reduction)
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
    raise ValueError(f"problem_type {kind!r} is not one of {', '.join(PROBLEM_TYPES)}")


def loss_count(labels: torch.Tensor, task: str, problem_type: str) -> int:
    """How many terms the mean of `classification_loss` averages over."""
    if task == TOKEN or problem_type == "single_label_classification":
        return int((labels != -100).sum())
    return labels.numel()


def head_renames(model_type: str, task: str, to_checkpoint: bool):
    """Rename the head's keys between kaki (`score.`) and the checkpoint (`classifier.` for some)."""
    ckpt = head_name(model_type, task) + "."
    src, dst = (HEAD + ".", ckpt) if to_checkpoint else (ckpt, HEAD + ".")

    def rename(key: str) -> str:
        return dst + key[len(src):] if key.startswith(src) else key

    return rename

