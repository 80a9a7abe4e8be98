"""`kaki.load()` and the `LLM` object: text at the edges around the token-id engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from kaki.checkpoint import DTYPES, assign_weights, renamed_sources, tensor_sources, validate
from kaki.config import ModelConfig, read_config, read_json
from kaki.engine import PrefixCache, Scheduler, TextSequence
from kaki.engine.prefix import DEFAULT_BUDGET_BYTES
from kaki.engine.scheduler import DEFAULT_MAX_ROWS
from kaki.errors import CheckpointError, KakiError, ParamError
from kaki.kernels import cpu_has_fast_bf16, note_slow_bf16
from kaki.model import CausalLM
from kaki.sampling import SamplingParams
from kaki.tokenizer import Tokenizer


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
                 generation_defaults: dict | None = None, tokenizer_files: dict | None = None):
        """tokenizer_files: what `save` writes for the tokenizer (name -> text, bytes or a file to
        copy) where `path` does not hold transformers' tokenizer files (Adept's release)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.path = path
        self.generation_defaults = generation_defaults or {}
        self.tokenizer_files = tokenizer_files

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
                          prefix_cache=self.prefix_cache)
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
                prompt=p if isinstance(p, str) else None, text=text.text, token_ids=list(seq.tokens),
                finish_reason=text.finish_reason or "length", prompt_token_ids=prompt_ids,
                logprobs=text.logprobs if sp.logprobs else None,
                top_logprobs=text.top_logprobs if sp.top_logprobs else None,
                prompt_logprobs=seq.prompt_logprobs))
        self.last_stats = sched.stats()
        yield [], out

    def save(self, out_dir: str | os.PathLike, dtype: str | None = None) -> Path:
        """Write a transformers model directory (safetensors, config.json, tokenizer files),
        atomically, that kaki and transformers' from_pretrained both load."""
        if self.tokenizer_files is not None:
            return save_model_dir(self.model, out_dir, dtype=dtype, extra_files=self.tokenizer_files)
        return save_model_dir(self.model, out_dir, tokenizer_dir=self.path, dtype=dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json")


def save_model_dir(model: CausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                   dtype: str | None = None, extra_files: dict[str, str | bytes | Path] | None = None,
                   config: ModelConfig | None = None, rename_key=None) -> Path:
    """config: what config.json says (default model.config); rename_key: a last rename of each
    weight's checkpoint name (a classification head's, kaki.heads)."""
    import json
    import shutil

    from kaki.checkpoint import save_weights, state_for_checkpoint, write_atomically, write_files

    target = DTYPES[dtype] if dtype else None
    cfg = config or model.config

    def write(tmp: Path) -> None:
        state = state_for_checkpoint(model)
        if rename_key is not None:
            state = {rename_key(k): v for k, v in state.items()}
        if target is not None:
            from kaki.quant import exact_keys
            keep = exact_keys(model)  # quantization scales are part of the format, never recast
            state = {k: v.to(target) if v.is_floating_point() and k not in keep else v for k, v in state.items()}
        save_weights(state, tmp)
        stored = next(iter(state.values())).dtype
        config = cfg.replace(torch_dtype=str(stored).replace("torch.", "")).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        write_files(tmp, extra_files or {})

    return write_atomically(out_dir, write)


# ----------------------------------------------------------------------------- loading

def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id found in the local Hugging Face cache (never downloaded)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; --model takes the model's directory")
    text = str(path_or_id)
    # `owner/name` may be a hub id, unless its first part is a local folder (`runs/nothere`):
    # then it is a path, and the answer is that it does not exist, not how to download it.
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not p.parent.is_dir():
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"{text} is neither a directory here nor a model in the local Hugging Face cache; if it is "
                f"a hub id, kaki never downloads at run time: fetch it once with `hf download {text}` (or "
                f"`huggingface-cli download {text}`) and run again") from None
    raise CheckpointError(f"model directory {p} does not exist")


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KakiError(f"device {device!r} asked for but this machine has no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise KakiError(f"device must be cpu, cuda[:N] or auto, not {device!r}")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: on CUDA the checkpoint's own dtype; on a CPU without native bf16, float32 when it
    fits in memory (bf16/fp16 GEMMs are several times slower there), else the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise KakiError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_fast_bf16():
            note_slow_bf16(pick_dtype("auto", cfg, device))
        return DTYPES[dtype]
    stored = DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float32)
    if device.type == "cuda":
        return stored
    if stored == torch.float32:
        return torch.float32
    if stored == torch.bfloat16 and cpu_has_fast_bf16():
        return torch.bfloat16
    fp32_bytes = cfg.num_parameters() * 4
    return torch.float32 if fp32_bytes < 0.8 * available_memory() else stored


def load(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device: str = "auto",
         progress: bool = False, quantize=None, quantize_head: bool = True) -> LLM:
    """Load a model directory (transformers layout, or Adept's Megatron release) with its
    tokenizer, ready to generate.

    quantize: "int8" or "int4" (or "int4:GROUP", or a kaki.quant.QuantSpec) quantizes the linear
    layers tensor by tensor while loading (the lm_head too unless quantize_head=False); a
    checkpoint saved quantized loads as it is stored without it."""
    from kaki import adept
    from kaki.quant import as_spec

    spec = as_spec(quantize, quantize_head)
    model_dir = resolve_model_path(path_or_id)
    if adept.is_release_dir(model_dir):
        if spec is not None:
            raise KakiError("--quantize does not apply to Adept's release layout directly; convert it "
                            "first (kaki convert SRC DST --to hf --quantize int8) and load DST")
        return adept.load_release(model_dir, dtype=dtype, device=device, progress=progress)
    cfg = read_config(model_dir)
    dev = pick_device(device)
    dt = pick_dtype(dtype, cfg, dev)
    model = load_model(model_dir, cfg, dt, dev, progress, quantize=spec)
    tokenizer = Tokenizer.from_dir(model_dir, cfg)
    return LLM(model, tokenizer, str(model_dir), generation_defaults(model_dir))


def build_model(cfg: ModelConfig, sources: dict, dtype: torch.dtype, device: torch.device,
                where: str, progress: bool = False, quantize=None, keep_plain: bool = False) -> CausalLM:
    """quantize (a QuantSpec) swaps in quantized linear layers that take their weights while
    loading (kaki.quant.load); a checkpoint stored quantized gets them whether asked or not.
    keep_plain leaves quantized weights unpacked (for saving them right away)."""
    place = None
    if quantize is not None or "quantization_config" in cfg.extra:
        from kaki.quant.load import prepare
        model, sources, place = prepare(cfg, sources, quantize, where, keep_plain)
    else:
        with torch.device("meta"):
            model = CausalLM(cfg)
        validate(model, sources, where)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = lambda it: tqdm(it, desc="loading", unit="tensor", leave=False)  # noqa: E731
    assign_weights(model, sources, dtype, device, bar, place=place)
    if place is not None:
        place.finish()
    return model.eval()


def load_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               progress: bool = False, quantize=None, keep_plain: bool = False) -> CausalLM:
    sources = renamed_sources(cfg, tensor_sources(model_dir))
    if cfg.tie_word_embeddings and "lm_head.weight" in sources:
        cfg = cfg.replace(tie_word_embeddings=False)  # a distinct head is stored: use it, as transformers does
    return build_model(cfg, sources, dtype, device, str(model_dir), progress, quantize, keep_plain)


# generation_config.json keys that map onto SamplingParams.
_GEN_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def generation_defaults(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    raw = read_json(path, "restore it from the original checkpoint or delete it")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object; restore it from the original checkpoint or delete it")
    out = {dst: raw[src] for src, dst in _GEN_KEYS.items() if raw.get(src) is not None}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0  # transformers ignores temperature unless do_sample
    elif raw.get("do_sample") and "temperature" not in out:
        out["temperature"] = 1.0
    return out
