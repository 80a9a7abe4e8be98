"""The one training loop: pretraining, full fine-tuning and LoRA differ only in what trains.

A step draws the global batch (every process draws the same samples from the seeded mixture and
takes its own slice), runs `grad_accum` micro-batches, and normalises the summed token losses by
the number of trained tokens in the whole global batch, so the update is the same whatever the
split into processes and micro-batches (DDP averages gradients over processes, hence x world).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from kaki.chat_format import get_format
from kaki.config import ModelConfig, read_config
from kaki.distributed import Dist, all_reduce_sum, barrier, setup, teardown
from kaki.errors import KakiError
from kaki.kernels import cpu_has_fast_bf16
from kaki.loading import load_model, resolve_model_path
from kaki.lora import apply_lora, load_adapter_weights, lora_modules, merge_adapter_dir, merge_into_model_dir, save_adapter
from kaki.model import CausalLM
from kaki.quant.train import QUANTIZED, route_frozen_layers
from kaki.saving import save_model_dir
from kaki.tokenizer import Tokenizer
from kaki.train import checkpointing as ckpt
from kaki.train.base import base_format, check_base_options, fit_to_data
from kaki.train.data import Corpus, check_data_files, collate, parse_data_arg, read_corpus
from kaki.train.fsdp import full_model_state, full_optimizer_tensors, load_full_optimizer_tensors, wrap_fsdp
from kaki.train.logs import Metrics, setup_logging
from kaki.train.memory import LOSS_CHUNK_ELEMS, plan, return_large_frees_to_os
from kaki.train.optim import default_warmup, lr_at, make_optimizer
from kaki.train.options import TrainOptions, to_dict

FP16_PERSIMMON = ("Persimmon must not be trained in float16: it produces NaN (the model was trained in "
                  "bfloat16; transformers' Persimmon notes say the same). Use --precision bf16 on a GPU, "
                  "or fp32")


def token_loss_sum(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets that are not -100 (inputs and targets are
    already shifted: targets[:, t] is the token after inputs[:, t])."""
    logits = model(inputs)  # (B, S, V)
    # Cross-entropy in fp32: a bf16 log-softmax over the vocabulary loses ~2 digits.
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def _chunk_loss(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, ignore_index=-100, reduction="sum")


def chunked_loss_sum(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """token_loss_sum without all the logits at once: the LM head and cross-entropy run over
    chunks of LOSS_CHUNK_ELEMS logits, each recomputed in backward (checkpointed), so only the
    hidden states are kept. fp32 logits of 2048 tokens of a 262k vocabulary would be 2.1 GB, and
    the softmax that cross-entropy keeps as much again. One chunk is the plain computation."""
    h = model.hidden_states(inputs).flatten(0, 1)  # (B*S, H)
    t = targets.flatten()
    rows = max(1, LOSS_CHUNK_ELEMS // model.config.vocab_size)
    if len(t) <= rows:
        return _chunk_loss(model.lm_head, h, t)
    total = None
    for a in range(0, len(t), rows):
        part = checkpoint(_chunk_loss, model.lm_head, h[a:a + rows], t[a:a + rows], use_reentrant=False)
        total = part if total is None else total + part
    return total


class LossModel(nn.Module):
    """The model and its loss as one module, for DDP: its forward must span everything that uses
    the parameters, and the chunked loss runs the LM head outside CausalLM.forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_loss_sum(self.model, inputs, targets)


def init_weights(model: torch.nn.Module, std: float) -> None:
    """GPT-style init: N(0, std) matrices, residual output projections scaled by 1/sqrt(2 L) so the
    residual stream's variance does not grow with depth; norm gains 1, biases 0."""
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                scale = (2 * layers) ** -0.5 if name.endswith(("self_attn.dense.weight", "dense_4h_to_h.weight")) else 1.0
                p.normal_(0.0, std * scale)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def config_for_pretraining(path: str, tok) -> ModelConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KakiError(f"--init-from-config {path} could not be read as JSON ({e})") from None
    raw.setdefault("vocab_size", tok.vocab_size)
    if raw["vocab_size"] < tok.vocab_size:
        raise KakiError(f"{path} has vocab_size {raw['vocab_size']} but the tokenizer has "
                        f"{tok.vocab_size} pieces; set vocab_size >= {tok.vocab_size}")
    # The special ids must be the tokenizer's, or generation would stop on the wrong token.
    raw["bos_token_id"] = tok.bos_id
    raw["eos_token_id"] = tok.eos_ids[0] if tok.eos_ids else raw.get("eos_token_id")
    raw["pad_token_id"] = tok.pad_id
    raw["torch_dtype"] = "float32"
    return ModelConfig.from_dict(raw)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after a step, and a checkpoint of that step was written."""

    def __init__(self, step: int, path: Path | None):
        super().__init__(f"interrupted after step {step}; checkpoint {path}")
        self.step, self.path = step, path


class StopRequest:
    """While active, the first Ctrl-C (SIGINT) only asks the run to stop after the current step,
    so that step's checkpoint is consistent (weights, optimizer and data position all after it);
    a second one interrupts at once, as Ctrl-C usually does. Signal handlers belong to the main
    thread: elsewhere (a run started from a thread) Ctrl-C keeps its usual meaning."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._old = None

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not the logger: a handler runs between any two bytecodes, perhaps inside
        # the logger's own lock.
        os.write(2, b"\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits "
                    b"without one)\n")

    def agreed(self, d: Dist) -> bool:
        """Whether to stop now: every process stops at the same step if any was asked to."""
        if not d.distributed:
            return self.requested
        return all_reduce_sum([float(self.requested)], d)[0] > 0


class Trainer:
    def __init__(self, o: TrainOptions):
        self.o = o
        if not o.data:
            raise KakiError("--data is required (FILE[:weight],...)")
        if not o.out:
            raise KakiError("--out is required (the run directory)")
        if bool(o.model) == bool(o.init_from_config):
            raise KakiError("pass exactly one of --model DIR (fine-tune) or --init-from-config "
                            "CONFIG.json (pretrain from random init)")
        if o.init_from_config and not o.tokenizer:
            raise KakiError("--init-from-config needs --tokenizer DIR (train one with `kaki train-tokenizer`)")
        if o.lora and o.init_from_config:
            raise KakiError("--lora adapts a trained model; it cannot start from --init-from-config")
        for name in ("batch_size", "grad_accum"):
            if getattr(o, name) is not None and getattr(o, name) < 1:
                raise KakiError(f"--{name.replace('_', '-')} must be >= 1")
        check_base_options(o)
        # Before anything loads or the run directory exists: a mistyped path costs nothing.
        check_data_files(o.data)
        if o.eval_data:
            check_data_files(o.eval_data, "--eval-data")
        return_large_frees_to_os()
        if o.threads:
            torch.set_num_threads(o.threads)
        self.d: Dist = setup(o.device)
        self.out = Path(o.out)
        # A run that fails before its first step removes the directory it made (run()).
        self.made_out = self.d.main and not self.out.exists()
        self.steps_run = 0
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(self.d)
        self.handlers = setup_logging(self.out, self.d.main)
        self.log = logger

    # ------------------------------------------------------------------ setup
    def read_sources(self):
        """The model's config and tokenizer (from --model, or --init-from-config and --tokenizer),
        and the precision to train in."""
        o = self.o
        if o.init_from_config:
            self.tokenizer_dir = Path(o.tokenizer)
            self.tok = Tokenizer.from_dir(self.tokenizer_dir)
            cfg = config_for_pretraining(o.init_from_config, self.tok)
        else:
            self.model_dir = resolve_model_path(o.model)
            self.tokenizer_dir = Path(o.tokenizer) if o.tokenizer else self.model_dir
            cfg = read_config(self.model_dir)
            self.tok = Tokenizer.from_dir(self.tokenizer_dir, cfg)
        self.cfg = cfg
        self.precision = self.pick_precision()
        self.base_dtype, self.spec = base_format(self.o)
        return cfg

    def memory_plan(self):
        """The memory table (kaki.train.memory), logged before anything loads; a run that cannot
        fit stops here with the table and the options that would make it fit."""
        p = plan(self.cfg, self.o, self.d.device, self.seq_len, self.base_dtype, self.spec, self.precision,
                 self.d.world)
        for line in p.table().splitlines():
            self.log.info(line)
        if not p.fits:
            raise KakiError(f"this run needs ~{p.total / 1e9:.2f} GB but {p.device} has "
                            f"{p.free_bytes / 1e9:.2f} GB free (table above); options that would make it fit: "
                            + "; ".join(p.fixes))
        return p

    def build(self) -> None:
        o, d = self.o, self.d
        cfg = self.read_sources()
        self.resume_from = ckpt.latest_checkpoint(self.out) if o.resume else None
        if o.resume and self.resume_from is None:
            self.log.info(f"--resume: no checkpoint in {self.out / ckpt.CHECKPOINTS}; starting fresh")
        if o.resume and d.main:
            ckpt.remove_partial(self.out)

        # The data before the model: its errors come first, and it sizes the run when
        # --seq-len or --batch-size is not given.
        corpus = self.read_corpus(cfg)
        self.seq_len, batch, note = fit_to_data(o, cfg, corpus.train_tokens(), d.world)
        if note:
            self.log.info(note)
        # What ran is what train_options.json and the checkpoints record.
        self.o = o = dataclasses.replace(o, seq_len=self.seq_len, batch_size=batch)
        self.data = corpus.pack(self.seq_len, o.seed, self.log.info)
        self.plan = self.memory_plan()
        self.build_model(cfg)
        self.global_batch = o.batch_size * o.grad_accum * d.world
        if o.max_steps:
            self.total = o.max_steps
        else:
            epochs = o.epochs if o.epochs else 1.0
            self.total = max(1, math.ceil(epochs * self.data.train.windows_per_epoch / self.global_batch))
        self.warmup = o.warmup_steps if o.warmup_steps is not None else default_warmup(self.total)
        self.optimizer = make_optimizer(self.named, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2),
                                        o.adam_eps, o.optimizer, d.device)
        self.step, self.tokens_seen = 0, 0
        if self.resume_from is not None:
            state, tensors = ckpt.restore(self.resume_from)
            self.check_resumable(state)
            if self.sharded:
                load_full_optimizer_tensors(self.fwd, self.optimizer, tensors)
            else:
                ckpt.load_optimizer_tensors(self.optimizer, self.named, tensors, self.resume_from)
            self.data.train.load_state(state["data"])
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.log.info(f"resumed from {self.resume_from} at step {self.step}")
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.log.info(f"{self.total} steps of {self.global_batch} x {self.seq_len} tokens "
                      f"({self.global_batch * self.seq_len:,} per step), warmup {self.warmup}, "
                      f"{len(self.data.eval)} eval sequences")

    def read_corpus(self, cfg) -> Corpus:
        """--data (and --eval-data) read and tokenized, not yet packed."""
        o = self.o
        eos = self.tok.eos_ids[0] if self.tok.eos_ids else None
        if eos is None:
            raise KakiError(f"the tokenizer in {self.tokenizer_dir} has no EOS token; packing needs one "
                            "between documents (set eos_token in tokenizer_config.json)")
        self.pad_id = self.tok.pad_id if self.tok.pad_id is not None else eos
        piece = lambda i: self.tok.id_to_piece(i) if i is not None else ""  # noqa: E731
        chat = get_format(o.chat_format, model_type=cfg.model_type, chat_template=self.tok.chat_template,
                          bos_token=piece(self.tok.bos_id), eos_token=piece(eos))
        return read_corpus(
            parse_data_arg(o.data), self.tok, eos, o.seed,
            eval_data=parse_data_arg(o.eval_data) if o.eval_data else None,
            eval_fraction=o.eval_fraction, mask_prompt=o.mask_prompt, train_on_prompt=o.train_on_prompt,
            strict=o.strict_data, chat=chat, log=self.log.info)

    def build_model(self, cfg) -> None:
        """Weights (random init, the base model, or the checkpoint being resumed), then what
        trains (everything, or LoRA adapters), then the DDP/FSDP wrapper."""
        o, d = self.o, self.d
        torch.manual_seed(o.seed)
        if self.resume_from is not None and not o.lora:
            model = load_model(self.resume_from, read_config(self.resume_from), torch.float32, d.device)
        elif o.init_from_config:
            model = CausalLM(cfg)
            init_weights(model, cfg.initializer_range)
            model = model.to(d.device)
        else:
            # The frozen base loads as inference loads it: streamed, quantized while loading. On
            # CUDA quantized layers keep only their plain codes: tinygemm's packed copy is a kernel
            # for a few rows (decoding), while training's thousands of rows run as fast through
            # dequantized blocks and a bf16 GEMM, and the copy would cost 0.5 byte per weight.
            model = load_model(self.model_dir, cfg, self.base_dtype, d.device, quantize=self.spec,
                               keep_plain=self.spec is not None and d.device.type == "cuda")
        self.adapt(model)

    def adapt(self, model) -> None:
        """What trains (everything, or LoRA adapters plus the modules the model names in
        `trained_whole`, peft's modules_to_save), then the DDP/FSDP wrapper."""
        o, d, cfg = self.o, self.d, self.cfg
        model.train()
        if o.lora:
            for p in model.parameters():
                p.requires_grad_(False)
            apply_lora(model, r=o.lora_r, alpha=o.lora_alpha, dropout=o.lora_dropout,
                       targets=[t.strip() for t in o.lora_targets.split(",") if t.strip()], dtype=torch.float32)
            for name in getattr(model, "trained_whole", ()):
                model.get_submodule(name).requires_grad_(True)
            prepare_frozen_base(model)
            if self.resume_from is not None:
                load_adapter_weights(model, self.resume_from)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_train = sum(p.numel() for _, p in self.named)
        n_all = sum(p.numel() for p in model.parameters()) + sum(
            m.out_features * m.in_features for m in model.modules() if hasattr(m, "weight_scale"))
        self.log.info(f"model {cfg.model_type}: {n_all:,} parameters, {n_train:,} trained "
                      f"({'LoRA' if o.lora else 'full'}), device {d.device}, precision {self.precision}, "
                      f"{d.world} process(es)")
        if o.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.sharded = o.fsdp and d.distributed
        self.fwd = self.wrap(model)
        # FSDP swaps parameters for sharded ones: take the names after wrapping.
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def check_resumable(self, state: dict) -> None:
        """The data position only means the same samples under the same packing, seed and global
        batch; anything else would silently train on other data than the checkpoint expects."""
        saved, o = state.get("options", {}), self.o
        # The base's format too: a LoRA adapter resumed over another base would train on another model.
        fixed = {"seq_len": self.seq_len, "seed": o.seed, "lora": o.lora, "quantize": o.quantize, "dtype": o.dtype}
        wrong = [f"--{k.replace('_', '-')} {saved[k]} (now {v})" for k, v in fixed.items()
                 if k in saved and (saved[k] is not None or k == "quantize") and saved[k] != v]
        if wrong:
            raise KakiError(f"{self.resume_from} was trained with {', '.join(wrong)}; resume with the "
                            "same values (or start a new --out)")
        old_batch = saved.get("batch_size", o.batch_size) * saved.get("grad_accum", o.grad_accum)
        if old_batch * state.get("world", self.d.world) != self.global_batch:
            self.log.warning("the global batch differs from the checkpoint's: training continues, but "
                             "not as the interrupted run would have")

    def pick_precision(self) -> str:
        o, dev = self.o, self.d.device
        p = o.precision
        if p == "auto":
            p = "bf16" if dev.type == "cuda" else "fp32"
        if p == "fp16" and self.cfg.model_type == "persimmon":
            raise KakiError(FP16_PERSIMMON)
        if p == "fp16" and dev.type != "cuda":
            raise KakiError("--precision fp16 needs a CUDA GPU; use fp32 on CPU")
        if p == "bf16" and dev.type == "cpu":
            if not cpu_has_fast_bf16():
                self.log.warning("bf16 autocast on a CPU without native bf16 runs several times slower "
                                 "than fp32 here; --precision fp32 is faster")
        return p

    def wrap(self, model):
        d = self.d
        if not d.distributed:
            return model
        if self.o.fsdp:
            return wrap_fsdp(model, d)
        module = LossModel(model) if self.wraps_loss else model
        # Every rank loads the same frozen base: its buffers (quantized codes and scales) are not
        # broadcast, neither at the start nor before every forward.
        prefix = "model." if self.wraps_loss else ""
        frozen = [f"{prefix}{n}.{b}" for n, m in model.named_modules() if isinstance(m, QUANTIZED)
                  for b, _ in m.named_buffers(recurse=False)]
        DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
        return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.d.device.type, dtype=dtype)

    # ------------------------------------------------------------------ steps
    # DDP wraps the model with its (chunked) loss; classifiers wrap the model alone.
    wraps_loss = True

    def loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inputs, targets = inputs.to(self.d.device), targets.to(self.d.device)
        with self.autocast():
            if self.sharded:  # FSDP gathers the head's weight in CausalLM.forward only
                return token_loss_sum(self.fwd, inputs, targets)
            if self.fwd is not self.model:
                return self.fwd(inputs, targets)
            return chunked_loss_sum(self.model, inputs, targets)

    def draw_global(self) -> tuple[list, int]:
        """The global batch's samples and how many loss terms (trained targets) they hold."""
        samples = [self.data.train.draw() for _ in range(self.global_batch)]
        return samples, sum(int(t[1:].sum()) for _, t in samples)

    def micro_loss(self, samples: list) -> torch.Tensor:
        """Summed loss of one micro-batch."""
        return self.loss_sum(*collate(samples, self.pad_id))

    def train_step(self) -> tuple[float, float, int]:
        o, d = self.o, self.d
        samples, count = self.draw_global()
        per_rank = o.batch_size * o.grad_accum
        mine = samples[d.rank * per_rank:(d.rank + 1) * per_rank]
        lr = lr_at(self.step, lr=o.lr, total=self.total, warmup=self.warmup, schedule=o.schedule,
                   min_ratio=o.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        for m in range(o.grad_accum):
            sync = m == o.grad_accum - 1 or not d.distributed or self.sharded
            ctx = self.fwd.no_sync() if not sync else nullcontext()
            with ctx:
                s = self.micro_loss(mine[m * o.batch_size:(m + 1) * o.batch_size])
                loss = s * (d.world / max(count, 1))
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(s.detach())
        norm = self.optimizer_step()
        (total,) = all_reduce_sum([total], d)
        self.step += 1
        self.tokens_seen += self.global_batch * self.seq_len
        return total / max(count, 1), norm, lr

    def optimizer_step(self) -> float:
        """Clip the accumulated gradients, step, clear them; returns the gradient norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.named]
        # The global norm (under FSDP a DTensor over all shards); max_norm inf only measures it.
        norm = torch.nn.utils.clip_grad_norm_(params, self.o.grad_clip if self.o.grad_clip > 0 else math.inf,
                                              foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float] | None:
        o, d = self.o, self.d
        windows = self.data.eval
        if not windows:
            return None
        batches = [windows[i:i + o.batch_size] for i in range(0, len(windows), o.batch_size)]
        if o.eval_batches:
            batches = batches[:o.eval_batches]
        self.model.eval()
        loss = count = 0.0
        # Every rank runs the same number of forwards (FSDP's gather needs all of them); a rank
        # past the end reruns batch 0 and does not count it.
        for i in range(math.ceil(len(batches) / d.world)):
            j = i * d.world + d.rank
            inputs, targets = collate(batches[j if j < len(batches) else 0], self.pad_id)
            s = self.loss_sum(inputs, targets)
            if j < len(batches):
                loss += float(s)
                count += int((targets != -100).sum())
        self.model.train()
        loss, count = all_reduce_sum([loss, count], d)
        mean = loss / max(count, 1)
        return mean, math.exp(min(mean, 50.0))

    # ------------------------------------------------------------------ writing
    def write_model(self, model, tmp: Path, dtype: str | None = None) -> None:
        if self.o.lora:
            save_adapter(model, tmp, base_model=str(self.model_dir))
        else:
            save_model_dir(model, tmp, tokenizer_dir=self.tokenizer_dir, dtype=dtype)

    def snapshot(self):
        """(model to write, optimizer tensors) on rank 0, (None, None) elsewhere. Under FSDP every
        rank takes part in gathering the full weights and moments; rank 0 then builds a CPU model
        on those tensors (no copy) to write with the ordinary savers."""
        if not self.sharded:
            return (self.model, ckpt.optimizer_tensors(self.optimizer, self.named)) if self.d.main else (None, None)
        state = full_model_state(self.fwd)
        tensors = full_optimizer_tensors(self.fwd, self.optimizer)
        if not self.d.main:
            return None, None
        with torch.device("meta"):
            cpu = CausalLM(self.cfg)
        if self.o.lora:
            apply_lora(cpu, r=self.o.lora_r, alpha=self.o.lora_alpha,
                       targets=[t.strip() for t in self.o.lora_targets.split(",") if t.strip()])
        cpu.load_state_dict(state, assign=True)
        if self.cfg.tie_word_embeddings:
            cpu.lm_head.weight = cpu.model.embed_tokens.weight
        return cpu, tensors

    def save(self) -> Path | None:
        """Checkpoint at the current step (all ranks call it: FSDP gathers the weights)."""
        state = {"data": self.data.train.state(), "tokens_seen": self.tokens_seen, "world": self.d.world,
                 "total_steps": self.total, "options": to_dict(self.o)}
        model, tensors = self.snapshot()
        path = None
        if self.d.main:
            path = ckpt.save_checkpoint(self.out, self.step, lambda tmp: self.write_model(model, tmp),
                                        tensors, state, self.o.keep_last)
            self.log.info(f"checkpoint {path}")
        barrier(self.d)
        return path

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        d = self.d
        failed = True
        try:
            self.build()
            o = self.o  # as build() resolved it (sequence length and batch chosen from the data)
            wandb_run = self.start_wandb() if d.main and o.wandb else None
            metrics = Metrics(self.out, self.step if self.resume_from else None, wandb_run) if d.main else None
            if d.main:
                (self.out / "train_options.json").write_text(json.dumps(to_dict(o), indent=2) + "\n")
            bar = tqdm(total=self.total, initial=self.step, disable=not (d.main and o.progress),
                       unit="step", dynamic_ncols=True)
            start = time.perf_counter()
            end = min(self.total, o.stop_at_step) if o.stop_at_step else self.total
            with StopRequest(self.resumable) as stop:
                while self.step < end:
                    t0 = time.perf_counter()
                    loss, norm, lr = self.train_step()
                    self.steps_run += 1
                    row = self.step_row(loss, norm, lr, time.perf_counter() - t0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                    **({"tok_s": f"{row['tok_per_s']:,.0f}"} if "tok_per_s" in row else {}))
                    if metrics and (self.step % o.log_every == 0 or self.step == end):
                        metrics.log({"step": self.step, **row, "elapsed_s": time.perf_counter() - start})
                    last = self.step == end
                    if (o.eval_every and self.step % o.eval_every == 0) or last:
                        ev = self.eval_row()
                        if ev and metrics:
                            metrics.log({"step": self.step, **ev})
                            self.log.info(f"step {self.step}: "
                                          + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in ev.items()))
                        if metrics:
                            metrics.plot(self.out)
                    saved = last or (o.save_every and self.step % o.save_every == 0)
                    if saved:
                        self.save()
                    if not last and stop.agreed(d):
                        bar.close()
                        self.stop_here(metrics, saved)
            bar.close()
            self.publish()
            if d.main:
                if metrics:
                    metrics.plot(self.out)
                self.log.info(f"done: model in {self.out}")
            barrier(d)
            if wandb_run is not None:
                wandb_run.finish()
            failed = False
            return self.out
        finally:
            for h in self.handlers:
                logger.remove(h)
            teardown(d)
            if failed and self.made_out and self.steps_run == 0:
                # Nothing was trained: leave no run directory that looks like one behind.
                shutil.rmtree(self.out, ignore_errors=True)

    # Ctrl-C saves a checkpoint and stops (StopRequest); classifier runs have no resumable ones.
    resumable = True

    def stop_here(self, metrics, saved: bool):
        """After Ctrl-C: the step just finished is checkpointed (unless it was already) and the run
        ends with TrainingInterrupted, which says where to resume from."""
        path = ckpt.latest_checkpoint(self.out) if saved else self.save()
        if metrics:
            metrics.plot(self.out)
        self.log.info(f"interrupted after step {self.step}: checkpoint {path}; run again with the same "
                      f"options and --resume to continue")
        raise TrainingInterrupted(self.step, path)

    def step_row(self, loss: float, norm: float, lr: float, seconds: float) -> dict:
        """One step's metrics.jsonl figures."""
        return {"loss": loss, "lr": lr, "grad_norm": norm, "tokens": self.tokens_seen,
                "tok_per_s": self.global_batch * self.seq_len / seconds}

    def eval_row(self) -> dict | None:
        ev = self.evaluate()
        return {"eval_loss": ev[0], "eval_ppl": ev[1]} if ev else None

    def publish(self) -> None:
        """The final model at the top of --out (all ranks call it: FSDP gathers the weights)."""
        o = self.o
        model, _ = self.snapshot()
        if self.d.main:
            ckpt.publish_model(self.out, lambda tmp: self.write_model(model, tmp, o.save_dtype))
            if o.lora and o.merge and (self.spec is not None or self.base_dtype != torch.float32):
                # The live base is quantized or narrower than its checkpoint: merge against the
                # checkpoint's own float weights, as `kaki merge-lora` does.
                note = merge_adapter_dir(self.out, self.model_dir, self.out / "merged", o.save_dtype or "bfloat16")
                self.log.info(note)
            elif o.lora and o.merge:
                merge_into_model_dir(model, self.out / "merged", self.tokenizer_dir, o.save_dtype)

    def start_wandb(self):
        try:
            import wandb
        except ImportError:
            raise KakiError("--wandb needs the wandb package: pip install 'kaki[wandb]'") from None
        return wandb.init(project=self.o.wandb_project, config=to_dict(self.o), dir=str(self.out))


def prepare_frozen_base(model) -> None:
    """After LoRA is applied: vectors (norms, biases) become float32 (kaki.train.memory counts
    them so), an embedding stored narrower hands float32 on, and every frozen layer that is
    quantized or narrower than float32 runs through kaki.quant.train.FrozenLinear."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2 and p.dtype != torch.float32:
                p.data = p.data.float()
    emb = model.model.embed_tokens
    if emb.weight.dtype != torch.float32:
        emb.register_forward_hook(lambda mod, args, out: out.float())
    route_frozen_layers(model, skip=set(lora_modules(model)))


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations."""
    for layer in model.model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner):
            return checkpoint(_inner, *args, use_reentrant=False)

        layer.forward = forward
