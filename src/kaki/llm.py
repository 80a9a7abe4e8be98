"""`kaki.load()` and the `LLM` object: text at the edges around the token-id engine.

Finding and loading a model directory is kaki.loading's, saving kaki.saving's, device and dtype
choice kaki.device's; this module puts them together."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from kaki.adept.release import is_release_dir, load_release
from kaki.config import ModelConfig, read_config
from kaki.device import pick_device, pick_dtype
from kaki.engine import PrefixCache, Scheduler, TextSequence
from kaki.engine.draft import DraftModel, check_same_vocabulary
from kaki.engine.prefix import DEFAULT_BUDGET_BYTES
from kaki.engine.scheduler import DEFAULT_MAX_ROWS
from kaki.errors import KakiError, ParamError
from kaki.loading import generation_defaults, load_model, resolve_model_path
from kaki.model import CausalLM
from kaki.quant import as_spec
from kaki.sampling import DEFAULT_DRAFT, SamplingParams, parse_speculate
from kaki.saving import save_model_dir
from kaki.tokenizer import Tokenizer
from kaki.tp import start


@dataclass
class Completion:
    prompt: str | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    prompt_token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None


class LLM:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer, path: str | None = None,
                 generation_defaults: dict | None = None, tokenizer_files: dict | None = None,
                 speculate: str | None = None):
        """tokenizer_files: what `save` writes for the tokenizer (name -> text, bytes or a file to
        copy) where `path` does not hold transformers' tokenizer files (Adept's release);
        speculate: "ngram[:K]" or None, for requests whose params do not say (kaki.engine.speculative;
        "draft[:K]" once `set_draft` has given a draft model)."""
        self.draft: DraftModel | None = None
        self.speculate = speculate
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.path = path
        self.generation_defaults = generation_defaults or {}
        self.tokenizer_files = tokenizer_files

    @property
    def speculate(self) -> str | None:
        """Speculative decoding for requests whose params do not say: "ngram[:K]", "draft[:K]"
        (with `draft`), "off" or None."""
        return self._speculate

    @speculate.setter
    def speculate(self, value: str | None) -> None:
        if parse_speculate(value)[0] == "draft" and self.draft is None:
            raise ParamError("speculate", f"is {value!r} but no draft model is set (kaki.load(..., draft_model=DIR) "
                             "or LLM.set_draft)")
        self._speculate = value

    speculative = speculate  # the earlier name

    def set_draft(self, draft: "LLM | str | os.PathLike | None", k: int | None = None) -> None:
        """Speculate with a draft model (an LLM, or a directory loaded with this model's dtype and
        device) drafting up to `k` tokens per step, for every request that does not say; None
        turns it off. The draft must use this model's tokenizer."""
        if draft is None:
            self.draft = None
            if parse_speculate(self._speculate)[0] == "draft":
                self._speculate = None
            return
        # Under tensor parallelism every rank loads the draft whole (it is small) and drafts alike.
        if not isinstance(draft, LLM):
            draft = load(draft, dtype=self.model.dtype, device=str(self.model.device))
        check_same_vocabulary(self.tokenizer, draft.tokenizer, self.config.vocab_size, draft.config.vocab_size,
                              name=f"draft model {draft.path or ''}".strip())
        self.draft = DraftModel(draft.model, self.config.vocab_size, k or DEFAULT_DRAFT)
        self.speculate = f"draft:{self.draft.k}"

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def eos_ids(self) -> list[int]:
        return sorted(set(self.tokenizer.eos_ids) | set(self.config.eos_token_ids))

    def sampling(self, params: SamplingParams | None = None, **kwargs) -> SamplingParams:
        """Sampling params from the model's generation_config.json defaults, overridden by kwargs."""
        if params is not None:
            if kwargs:
                raise TypeError("pass either a SamplingParams or keyword arguments, not both")
            return params
        return SamplingParams.from_kwargs(**{**self.generation_defaults, **kwargs})

    def encode_prompt(self, prompt: str | list[int], add_bos: bool | None = None) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise ParamError("prompt", f"token ids must be integers in [0, {self.config.vocab_size})")
        return list(prompt)

    # Engine settings, per LLM: sequences decoded together (more prompts wait for a free row),
    # and the bytes of keys and values kept for prompt prefixes across calls (0 turns it off).
    max_batch_size: int = DEFAULT_MAX_ROWS
    prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES
    _prefix_cache: PrefixCache | None = None

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefix cache `generate` and `stream` share (kaki.engine.prefix); None when off."""
        pc, model = self._prefix_cache, self.model
        if self.prefix_cache_bytes <= 0:
            return None
        if pc is None or (pc.budget_bytes, pc.dtype, pc.device) != (self.prefix_cache_bytes, model.dtype, model.device):
            pc = self._prefix_cache = PrefixCache(self.config, model.dtype, model.device, self.prefix_cache_bytes)
        return pc

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 add_bos: bool | None = None, **sampling) -> list[Completion]:
        """Complete each prompt (text or token ids), up to `max_batch_size` of them at a time."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        sp = self.sampling(params, **sampling)
        results = list(self.run(list(prompts), [sp] * len(prompts), add_bos=add_bos, stream=False))
        return results[-1][1]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               add_bos: bool | None = None, **sampling) -> Iterator[str]:
        """Text pieces of one completion as they are generated (never a split character)."""
        sp = self.sampling(params, **sampling)
        for pieces, done in self.run([prompt], [sp], add_bos=add_bos, stream=True):
            if done is None and pieces[0]:  # the final (_, completions) item has no pieces
                yield pieces[0]

    def run(self, prompts: list, params: list[SamplingParams], add_bos: bool | None = None,
            stream: bool = True) -> Iterator[tuple[list[str], list[Completion] | None]]:
        """The text edge of the engine (kaki.engine): yields each step's new text per prompt, and
        finally ([], completions)."""
        ids = [self.encode_prompt(p, add_bos) for p in prompts]
        sched = Scheduler(self.model, self.eos_ids, max_rows=self.max_batch_size, max_len=self.context_length,
                          prefix_cache=self.prefix_cache, speculative=self.speculate, draft=self.draft)
        index = {sched.add_request(p, sp): i for i, (p, sp) in enumerate(zip(ids, params))}
        seqs = [sched.sequence(seq_id) for seq_id in index]
        texts = [TextSequence(self.tokenizer, p, sp.stop) for p, sp in zip(ids, params)]
        try:
            while sched.has_work:
                pieces = [""] * len(prompts)
                for event in sched.step():
                    i = index[event.seq]
                    pieces[i] += texts[i].push(event)
                    if texts[i].error is not None:
                        raise KakiError(f"generating prompt {i} failed: {texts[i].error}")
                    if texts[i].stopped and event.finish_reason is None:
                        sched.abort(event.seq, "stop")
                if stream:
                    yield pieces, None
        finally:
            for seq_id in index:  # a stream closed early: its prefix blocks go back to the cache
                sched.abort(seq_id)
        out = []
        for p, seq, text, sp, prompt_ids in zip(prompts, seqs, texts, params, ids):
            out.append(Completion(
                # The text's ids: with speculation the sequence may hold drafts past a stop string.
                prompt=p if isinstance(p, str) else None, text=text.text, token_ids=list(text.token_ids),
                finish_reason=text.finish_reason or "length", prompt_token_ids=prompt_ids,
                logprobs=text.logprobs if sp.logprobs else None,
                top_logprobs=text.top_logprobs if sp.top_logprobs else None,
                prompt_logprobs=seq.prompt_logprobs))
        self.last_stats = sched.stats()
        yield [], out

    def save(self, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
        """Write a transformers model directory (safetensors, config.json, tokenizer files),
        atomically, that kaki and transformers' from_pretrained both load."""
        if getattr(self.model, "tp", None) is not None:
            raise KakiError("this model is one rank of a tensor-parallel model; save the checkpoint it was "
                            "loaded from instead (load it with tensor_parallel=1 to save a copy)")
        if self.tokenizer_files is not None:
            return save_model_dir(self.model, out_dir, dtype=dtype, extra_files=self.tokenizer_files)
        return save_model_dir(self.model, out_dir, tokenizer_dir=self.path, dtype=dtype)


def load(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device: str = "auto",
         progress: bool = False, quantize=None, quantize_head: bool = True, speculate: str | None = None,
         draft_model=None, draft_k: int | None = None, tensor_parallel: int = 1,
         speculative: str | None = None) -> LLM:
    """Load a model directory (transformers layout, or Adept's Megatron release) with its
    tokenizer, ready to generate.

    quantize: "int8" or "int4" (or "int4:GROUP", or a kaki.quant.QuantSpec) quantizes the linear
    layers tensor by tensor while loading (the lm_head too unless quantize_head=False); a
    checkpoint saved quantized loads as it is stored without it. speculate: "ngram[:K]" turns
    prompt-lookup speculative decoding on for every request that does not say (LLM.speculate;
    `speculative` is its earlier name); draft_model: a directory (or LLM) of a smaller model with the
    same tokenizer that drafts up to draft_k tokens per step instead (LLM.set_draft).
    tensor_parallel: N > 1 loads this process's rank of the model split over N processes (run
    under `torchrun --nproc-per-node N`; kaki.tp), reading only its slices of the weights."""
    spec = as_spec(quantize, quantize_head)
    if speculative is not None and speculate is not None and speculative != speculate:
        raise ParamError("speculate", "is given twice (speculate and its old name speculative); give one")
    speculate = speculate if speculate is not None else speculative
    if draft_k is not None and draft_model is None:
        raise ParamError("draft_k", "needs draft_model")
    parse_speculate(speculate)
    model_dir = resolve_model_path(path_or_id)
    tp, dev = start(tensor_parallel, pick_device(device))
    if is_release_dir(model_dir):
        if spec is not None:
            raise KakiError("--quantize does not apply to Adept's release layout directly; convert it "
                            "first (kaki convert SRC DST --to hf --quantize int8) and load DST")
        model, tokenizer, files = load_release(model_dir, dtype=dtype, device=str(dev), progress=progress, tp=tp)
        llm = LLM(model, tokenizer, str(model_dir), tokenizer_files=files)
    else:
        cfg = read_config(model_dir)
        dt = pick_dtype(dtype, cfg, dev)
        model = load_model(model_dir, cfg, dt, dev, progress, quantize=spec, tp=tp)
        tokenizer = Tokenizer.from_dir(model_dir, cfg)
        llm = LLM(model, tokenizer, str(model_dir), generation_defaults(model_dir))
    if draft_model is not None:
        if speculate not in (None, "off") and parse_speculate(speculate)[0] != "draft":
            raise ParamError("speculate", f"is {speculate!r} but a draft_model is given too; give one of them")
        llm.set_draft(draft_model, draft_k if draft_k is not None else parse_speculate(speculate or "draft")[1])
    elif speculate is not None:
        llm.speculate = speculate
    return llm
