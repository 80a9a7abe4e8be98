"""`kaki train --task sequence-classification|token-classification`: fine-tune a classifier.

The run starts from a causal LM (its lm_head dropped, a new `score` head initialised as
transformers does) or from a classifier directory, trains everything or LoRA adapters plus the
whole head, and writes a transformers `*For{Sequence,Token}Classification` directory to --out
(with --lora the adapters are merged in, so the output loads anywhere). Each step draws the global
batch from a seeded per-epoch shuffle of the examples; losses are summed and divided by the number
of loss terms in the whole global batch, so the update does not depend on the micro-batch split.
Evaluation reports the loss and accuracy with macro F1 (classes), or the MSE (regression).
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

from kaki.classify import build_classifier, classifier_config, labels_of, save_classifier
from kaki.errors import KakiError
from kaki.heads import TOKEN, classification_loss, loss_count, task_of
from kaki.lora import merge_lora
from kaki.train import checkpointing as ckpt
from kaki.train import classify_data as cd
from kaki.train.base import DEFAULT_BATCH
from kaki.train.data import BadLines, parse_data_arg
from kaki.train.loop import Trainer
from kaki.train.optim import default_warmup, make_optimizer
from kaki.train.options import TrainOptions


def macro_f1(pred: list[int], true: list[int]) -> float:
    """Mean F1 over the classes present in either list (scikit-learn's macro average)."""
    classes = sorted(set(pred) | set(true))
    scores = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        fp = sum(p == c and t != c for p, t in zip(pred, true))
        fn = sum(p != c and t == c for p, t in zip(pred, true))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def multi_label_f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Macro F1 over label columns of multi-hot (N, L) predictions."""
    tp = (pred & true).sum(0).float()
    fp = (pred & ~true).sum(0).float()
    fn = (~pred & true).sum(0).float()
    f1 = torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn), torch.zeros_like(tp))
    return float(f1.mean())


def prediction_metrics(logits: list[torch.Tensor], targets: list[torch.Tensor], task: str,
                       problem_type: str) -> dict[str, float]:
    if task == TOKEN:
        lg, tg = torch.cat([x.flatten(0, -2) for x in logits]), torch.cat([t.flatten() for t in targets])
        keep = tg != -100
        pred, true = lg[keep].argmax(-1), tg[keep]
    else:
        lg, tg = torch.cat(logits), torch.cat(targets)
        if problem_type == "regression":
            return {"mse": float(((lg.squeeze(-1) if lg.shape[-1] == 1 else lg) - tg).pow(2).mean())}
        if problem_type == "multi_label_classification":
            pred, true = lg > 0, tg > 0.5  # sigmoid(logit) > 0.5
            return {"accuracy": float((pred == true).all(-1).float().mean()),  # exact match
                    "f1": multi_label_f1(pred, true)}
        pred, true = lg.argmax(-1), tg
    return {"accuracy": float((pred == true).float().mean()) if len(true) else 0.0,
            "f1": macro_f1(pred.tolist(), true.tolist())}


class ClassifierTrainer(Trainer):
    wraps_loss = False  # batch_loss runs the DDP-wrapped model itself
    resumable = False  # no checkpoints to resume from: Ctrl-C stops the run as usual

    def __init__(self, o: TrainOptions):
        if o.quantize or o.dtype not in ("auto", "float32"):
            raise KakiError(f"--quantize and --dtype apply to --task causal-lm; --task {o.task} trains "
                            "on a float32 model")
        if o.init_from_config:
            raise KakiError(f"--task {o.task} fine-tunes a trained model: pass --model DIR (a causal LM "
                            "or a classifier), not --init-from-config")
        for flag, on in (("--resume", o.resume), ("--fsdp", o.fsdp), ("--merge", o.merge)):
            if on:
                raise KakiError(f"{flag} is not available with --task {o.task} (classifier runs are "
                                "short and write their final model only; with --lora it is merged already)")
        super().__init__(o)
        self.task = o.task

    # ------------------------------------------------------------------ setup
    def build(self) -> None:
        # Examples are not packed: --seq-len defaults to the context, --batch-size to 8.
        self.o = o = dataclasses.replace(self.o, batch_size=self.o.batch_size or DEFAULT_BATCH)
        d = self.d
        self.resume_from = None
        cfg = self.read_sources()
        base_task = task_of(cfg.extra.get("architectures"))
        if base_task is not None and base_task != self.task:
            raise KakiError(f"--model {o.model} is a {base_task} model; train it with --task {base_task}, "
                            "or start from a causal LM")
        base = cd.LabelSpace(labels_of(cfg), cfg.extra.get("problem_type")) if base_task else None

        bad = BadLines()
        files = cd.read_labelled([s.path for s in parse_data_arg(o.data)], self.task, o.strict_data, bad)
        if o.eval_data:
            train = [r for f in files for r in f]
            held = [r for f in cd.read_labelled([s.path for s in parse_data_arg(o.eval_data)], self.task,
                                                o.strict_data, bad) for r in f]
        else:
            train, held = cd.split(files, o.eval_fraction, o.seed)
        for item in bad.items:
            self.log.info(f"skipped bad line {item}")
        given = [x.strip() for x in o.labels.split(",") if x.strip()] if o.labels else None
        if given and base is not None and given != base.names:
            raise KakiError(f"--labels {','.join(given)} differ from --model's labels "
                            f"{','.join(base.names)}; start from the causal LM to train new labels")
        self.space = cd.infer_labels(train + held, self.task, given, base)
        pad = cfg.pad_token_id
        if pad is None:
            pad = self.tok.pad_id if self.tok.pad_id is not None else (self.tok.eos_ids or [None])[0]
        if pad is None:
            raise KakiError(f"{self.model_dir} defines no pad_token_id and its tokenizer no pad or EOS "
                            "token; set pad_token_id in config.json")
        self.pad_id = pad
        self.clf_cfg = classifier_config(cfg, self.task, self.space.names, self.space.problem_type, pad)
        self.seq_len = o.seq_len or cfg.max_position_embeddings
        self.train_set = cd.make_examples(train, self.task, self.space, self.tok, self.seq_len)
        self.eval_set = cd.make_examples(held, self.task, self.space, self.tok, self.seq_len)
        self.log.info(f"{self.task}: {len(self.train_set)} training and {len(self.eval_set)} eval examples, "
                      f"{self.space.problem_type}, labels {', '.join(self.space.names)}")

        torch.manual_seed(o.seed)
        model = build_classifier(self.model_dir, self.clf_cfg, self.task, len(self.space.names), torch.float32,
                                 d.device, new_head=base is None, seed=o.seed)
        self.adapt(model)
        self.global_batch = o.batch_size * o.grad_accum * d.world
        epochs = o.epochs if o.epochs else 1.0
        self.total = o.max_steps or max(1, math.ceil(epochs * len(self.train_set) / self.global_batch))
        self.warmup = o.warmup_steps if o.warmup_steps is not None else default_warmup(self.total)
        self.optimizer = make_optimizer(self.named, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2),
                                        o.adam_eps, o.optimizer, d.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step, self.drawn, self._epoch, self.tokens_seen = 0, 0, None, 0
        self.log.info(f"{self.total} steps of {self.global_batch} examples, warmup {self.warmup}")

    # ------------------------------------------------------------------ steps
    def draw(self, n: int) -> list[cd.Example]:
        """The next n examples of a seeded shuffle per epoch."""
        out, size = [], len(self.train_set)
        for _ in range(n):
            epoch, k = divmod(self.drawn, size)
            if self._epoch != epoch:
                self._order = list(range(size))
                random.Random(f"{self.o.seed}:{epoch}").shuffle(self._order)
                self._epoch = epoch
            out.append(self.train_set[self._order[k]])
            self.drawn += 1
        return out

    def batch_loss(self, examples: list[cd.Example], module=None):
        """(summed loss, logits, targets) of one micro-batch through `module` (default the
        training wrapper)."""
        ids, valid, targets = cd.collate(examples, self.task, self.space.problem_type, self.pad_id)
        dev = self.d.device
        with self.autocast():
            logits = (module or self.fwd)(ids.to(dev), valid.to(dev))
        loss = classification_loss(logits, targets, self.task, self.space.problem_type, reduction="sum")
        return loss, logits, targets

    def draw_global(self) -> tuple[list[cd.Example], int]:
        samples = self.draw(self.global_batch)
        _, _, targets = cd.collate(samples, self.task, self.space.problem_type, self.pad_id)
        return samples, loss_count(targets, self.task, self.space.problem_type)

    def micro_loss(self, samples: list[cd.Example]) -> torch.Tensor:
        return self.batch_loss(samples)[0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Loss and metrics over the held-out examples (on the main process; the others wait)."""
        if not self.eval_set or not self.d.main:
            return None
        bs = self.o.batch_size
        self.model.eval()
        loss = count = 0.0
        logits, targets = [], []
        for i in range(0, len(self.eval_set), bs):
            chunk = self.eval_set[i:i + bs]
            s, lg, tg = self.batch_loss(chunk, self.model)  # not DDP: only this process runs it
            loss += float(s)
            count += loss_count(tg, self.task, self.space.problem_type)
            if self.task == TOKEN:  # rows differ in length across batches: keep them per example
                logits += [lg[b].float().cpu() for b in range(len(chunk))]
                targets += [tg[b] for b in range(len(chunk))]
            else:
                logits.append(lg.float().cpu())
                targets.append(tg)
        self.model.train()
        out = {"eval_loss": loss / max(count, 1)}
        out.update({f"eval_{k}": v for k, v in
                    prediction_metrics(logits, targets, self.task, self.space.problem_type).items()})
        return out

    # ------------------------------------------------------------------ Trainer.run's hooks
    def eval_row(self) -> dict[str, float] | None:
        return self.evaluate()

    def step_row(self, loss: float, norm: float, lr: float, seconds: float) -> dict:
        return {"loss": loss, "lr": lr, "grad_norm": norm, "examples": self.drawn,
                "examples_per_s": self.global_batch / seconds}

    def save(self) -> None:
        """No resumable checkpoints: classifier runs are short and write the final model only."""

    def publish(self) -> None:
        if not self.d.main:
            return
        model = self.model
        if self.o.lora:
            merge_lora(model)  # training is over: fold the adapters in for a plain classifier
        ckpt.publish_model(self.out, lambda tmp: save_classifier(model, self.clf_cfg, tmp, self.tokenizer_dir,
                                                                 self.o.save_dtype))
