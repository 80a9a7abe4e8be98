"""Training options: one table that is both the command-line flags and the YAML config keys.

`--config train.yaml` holds any of the flags as keys (`seq_len` or `seq-len`); flags given on the
command line win over the file, and the file wins over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaki.errors import KakiError


def opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainOptions:
    # what to train
    task: str = opt("causal-lm", "causal-lm (next-token), or a classifier head trained on labelled JSONL",
                    choices=["causal-lm", "sequence-classification", "token-classification"])
    labels: str | None = opt(None, "classification: label names in id order, comma-separated (default: "
                                   "--model's id2label when it is a classifier, else the data's, sorted)")
    data: str | None = opt(None, "training JSONL files as FILE[:weight],... (records: `text` or `messages`)")
    out: str | None = opt(None, "run directory: checkpoints/, metrics.jsonl, loss.png, train.log and "
                               "the final model")
    model: str | None = opt(None, "model directory to fine-tune (default without --init-from-config: "
                                  "$KAKI_MODEL, else the bundled kaki-tiny)")
    init_from_config: str | None = opt(None, "pretrain from random init: a config.json for the model")
    tokenizer: str | None = opt(None, "tokenizer directory (with --init-from-config)")
    eval_data: str | None = opt(None, "held-out JSONL files (default: hold out --eval-fraction of --data)")
    eval_fraction: float = opt(0.01, "share of each --data file's documents held out for eval")
    # data handling
    seq_len: int | None = opt(None, "tokens per packed sequence (default: min(1024, model context), shorter "
                                    "when a --data file holds fewer tokens)")
    mask_prompt: bool = opt(False, "for `text` records: train only on replies (after <bot>: or adept:)")
    train_on_prompt: bool = opt(False, "for `messages` records: train on every token, not only replies")
    chat_format: str = opt("auto", "how `messages` records are rendered (kaki.chat_format; auto: the "
                                   "model's chat_template, else adept for persimmon)",
                           choices=["auto", "adept", "openchatkit", "template", "plain"])
    strict_data: bool = opt(False, "stop at the first bad data line instead of skipping and counting")
    # optimisation
    batch_size: int | None = opt(None, "sequences per micro-batch on each process (default: 8, fewer when "
                                       "an epoch of the data holds fewer sequences)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (global batch = batch_size x "
                             "grad_accum x processes)")
    max_steps: int | None = opt(None, "optimizer steps (wins over --epochs)")
    epochs: float | None = opt(None, "passes over the training sequences (default 1 when no --max-steps)")
    stop_at_step: int | None = opt(None, "end this run after step N while the schedule still spans the "
                                         "whole run (a time-boxed part of it; --resume goes on later)")
    lr: float = opt(3e-4, "peak learning rate")
    optimizer: str = opt("adamw", "adamw, or adamw8bit (bitsandbytes, CUDA only)", choices=["adamw", "adamw8bit"])
    schedule: str = opt("cosine", "learning-rate decay after warmup", choices=["cosine", "linear", "constant"])
    warmup_steps: int | None = opt(None, "linear warmup steps (default: 5%% of the steps, at most 1000)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr")
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (never on norms and biases)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    seed: int = opt(0, "seed for init, data order and mixing")
    # evaluation, checkpoints, logging
    eval_every: int = opt(200, "evaluate every N steps (0: only at the end)")
    eval_batches: int | None = opt(None, "evaluate on at most N batches (default: all held-out data)")
    save_every: int = opt(500, "write a checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(3, "checkpoints to keep (older ones are deleted)")
    resume: bool = opt(False, "continue from the newest checkpoint in --out")
    save_dtype: str | None = opt(None, "dtype of the final model's weights (default: the training dtype)",
                                 choices=["float32", "bfloat16", "float16"])
    log_every: int = opt(1, "write a metrics.jsonl line every N steps")
    wandb: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works without a login)")
    wandb_project: str = opt("kaki", "W&B project name")
    progress: bool = opt(True, "show a progress bar (--no-progress to hide it)")
    # hardware and precision
    device: str = opt("auto", "cpu, cuda[:N] or auto (torchrun: each process takes cuda:LOCAL_RANK)")
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere", choices=["auto", "fp32", "bf16", "fp16"])
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice)")
    activation_checkpointing: bool = opt(False, "recompute each layer's activations in backward (less memory)")
    fsdp: bool = opt(False, "fully sharded data parallel under torchrun (default there: DDP)")
    dtype: str = opt("auto", "storage dtype of the frozen base with --lora (auto: float32; bfloat16 for "
                             "what --quantize leaves float); trained weights stay float32 masters",
                     choices=["auto", "float32", "bfloat16", "float16"])
    quantize: str | None = opt(None, "with --lora: quantize the frozen base's linear layers while loading, "
                                     "int8 or int4[:GROUP] (as every model-loading command; QLoRA)")
    memory_budget: float | None = opt(None, "GB the run may use (default: the device's free memory); the "
                                            "memory table checks against it before anything loads")
    dry_run: bool = opt(False, "print the memory table (needs only the model's config.json) and exit")
    # LoRA
    lora: bool = opt(False, "train low-rank adapters instead of all weights")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_targets: str = opt("all-linear", "comma-separated linear layer names to adapt, in kaki's or "
                                          "the checkpoint's naming (query_key_value,dense or q_proj,o_proj)")
    merge: bool = opt(False, "with --lora: also write OUT/merged, a plain model with the adapter merged in")

    def data_path_list(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data or [])


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per option; defaults are suppressed so we can tell what the user typed."""
    p.add_argument("--config", metavar="YAML", default=argparse.SUPPRESS,
                   help="YAML file whose keys are these flags (command-line flags win)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        meta = f.metadata
        default_note = "" if f.default is None or isinstance(f.default, bool) else f" (default {f.default})"
        help_text = meta["help"] + default_note
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
            continue
        kind = _type_of(f)
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=meta.get("choices"),
                       help=help_text)


def _type_of(f: dataclasses.Field):
    t = str(f.type)
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def from_sources(cli: dict[str, Any], config_path: str | None) -> TrainOptions:
    values: dict[str, Any] = {}
    if config_path:
        values.update(read_yaml(config_path))
    values.update(cli)
    return TrainOptions(**values)


def read_yaml(path: str) -> dict[str, Any]:
    # Here, not at the top: every `kaki` command builds the train parser from this module, and
    # only --config needs yaml.
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KakiError(f"--config {path} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise KakiError(f"--config {path} is not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise KakiError(f"--config {path} must be a mapping of flag names to values")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise KakiError(f"--config {path}: unknown key {key!r}; keys are the flags of `kaki train` "
                            f"(e.g. {', '.join(list(FIELDS)[:5])})")
        if name in ("data", "eval_data", "labels") and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[name] = value
    return out


def to_dict(o: TrainOptions) -> dict[str, Any]:
    return dataclasses.asdict(o)
