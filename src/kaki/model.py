"""One decoder-only transformer for Persimmon, GPT-NeoX/Pythia, Llama and GPT-J, set by a ModelConfig.

Parameter names are Persimmon's as transformers publishes them (`model.layers.N.self_attn.
query_key_value`), so a Persimmon checkpoint loads with no renaming; other families go through the
small name tables in `kaki.checkpoint`. The KV cache is passed to `forward` explicitly.

Tensor parallelism (Megatron's split, kaki.tp) is the same model built from one rank's config
(`kaki.tp.shard.local_config`: its heads, KV heads and MLP units) with a `TensorParallel`: the
attention output and MLP down projections then sum their partial outputs over the ranks (one
all-reduce each), and the embedding and lm_head hold a block of vocabulary rows.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kaki import small_m
from kaki.config import ModelConfig
from kaki.errors import CheckpointError
from kaki.kernels import Linear
from kaki.tp.group import TensorParallel


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2/GPT-J's tanh GELU spelled out as transformers spells it: F.gelu(approximate="tanh")
    is the same function but rounds differently (~1e-6 in fp32 logits, more in bf16)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "relu2": relu2,
    "gelu": F.gelu,  # exact erf gelu, as NeoX's "gelu"
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in fp32, cast back, then scale (that order matters for bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.rms_norm else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class AttentionCache(Protocol):
    """What `CausalLM.forward` reads and writes of a KV cache; nothing else of it is touched.

    One forward pass over `input_ids` (B, S) calls, in order:
    1. `begin(input_ids, positions, valid)`, before the layers: take slots for the S new tokens of
       each of the B rows (`valid` (B, S) is False in padding columns; None means all are real) and
       return `(positions, mask, causal)`: the rotary positions (B, S) (`positions` when given,
       else where each row's tokens go on), the boolean attention mask (B, 1, S, T) or None, and
       SDPA's `is_causal` flag;
    2. `update(layer, k, v)` in every layer, with the new keys and values (B, KV, S, D) after
       rotary: store them and return the keys and values the new queries attend over (B, KV, T, D);
    3. `end()`, after the layers: the new tokens now belong to the rows.

    Rotary positions are baked into the keys when they are stored, so where a token sits in the
    cache never changes its math; only the mask says which slots each query sees.
    `kaki.engine.kv.RowCache` (rows of their own lengths) implements it.
    """

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
              valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, bool]: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def end(self) -> None: ...


def attention_mask(B: int, S: int, start: int, key_valid: torch.Tensor | None,
                   device) -> torch.Tensor:
    """Boolean mask (B, 1, S, T) for S queries at slots [start, start + S) of one timeline:
    causal, and (key_valid (B, T)) only real keys."""
    T = start + S
    q_idx = torch.arange(start, T, device=device)[:, None]
    k_idx = torch.arange(T, device=device)[None, :]
    mask = k_idx <= q_idx  # (S, T) causal
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]  # (B, S, T)
    # A pad query may see no valid key at all; let every query see itself so no row is all
    # False (SDPA would return NaN there). Pad rows' outputs are never read.
    mask = mask | (k_idx == q_idx)
    return mask.reshape(-1, 1, S, T).expand(B, 1, S, T)


def _reduce(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    return x if tp is None else tp.all_reduce(x)


def _row_bias(bias: bool, tp: TensorParallel | None) -> bool:
    """A row-parallel layer's bias is added once, on rank 0, before the partial sums are reduced."""
    return bias and (tp is None or tp.first)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rot = cfg.rotary_ndims
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if cfg.fused_qkv:
            self.query_key_value = Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.attention_bias)
        else:
            self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
            self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
            self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.dense = Linear(q_dim, cfg.hidden_size, bias=_row_bias(cfg.attention_bias, tp))
        self.tp = tp
        self.fused = cfg.fused_qkv
        if cfg.qk_layernorm:
            # One (head_dim,) LayerNorm shared by all heads, applied before rotary (Persimmon).
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps)
        self.qk_norm = cfg.qk_layernorm
        self.rotate = rotate_every_two if cfg.rotary_interleaved else rotate_half
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, layer: int, cache: AttentionCache | None, mask, causal: bool):
        B, S, _ = x.shape
        if self.fused:
            # qkv rows are head-major: [q_h, k_h, v_h] per head (Persimmon and NeoX alike).
            qkv = self.query_key_value(x).view(B, S, self.n_heads, 3, self.head_dim)
            q, k, v = qkv.unbind(3)  # (B, S, H, D) each
        else:
            q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim)
            v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
        q = apply_rotary(q, cos, sin, self.rot, self.rotate)
        k = apply_rotary(k, cos, sin, self.rot, self.rotate)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, T, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        return _reduce(self.dense(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)), self.tp)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX layout: dim i pairs with dim i + R/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """GPT-J layout: dim 2j pairs with dim 2j + 1; (x0, x1, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., R/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (..., R)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int,
                 rotate=rotate_half) -> torch.Tensor:
    """Rotary on the first `rot` dims of each head; the rest pass through. `rotate` picks the
    pairing, and cos/sin must be laid out to match (see CausalLM.rotary)."""
    if rot == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size, bias=_row_bias(cfg.mlp_bias, tp))
        if cfg.gated_mlp:
            self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.gated = cfg.gated_mlp
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.tp = tp

    def forward(self, x):
        if self.gated:
            return _reduce(self.dense_4h_to_h(self.act(self.gate_proj(x)) * self.dense_h_to_4h(x)), self.tp)
        return _reduce(self.dense_4h_to_h(self.act(self.dense_h_to_4h(x))), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, tp: TensorParallel | None = None):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, tp)
        # GPT-J has no second norm: its MLP reads the attention's normalised input.
        self.shared_norm = cfg.shared_layernorm
        if not self.shared_norm:
            self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg, tp)
        self.parallel = cfg.use_parallel_residual
        self.index = index

    def forward(self, x, cos, sin, cache, mask, causal):
        h = self.input_layernorm(x)
        attn = self.self_attn(h, cos, sin, self.index, cache, mask, causal)
        if self.parallel:
            # NeoX sums as mlp + attn + residual, GPT-J as attn + mlp + residual: one addition
            # commutes exactly, but the residual must come last for bit-equality.
            return self.mlp(h if self.shared_norm else self.post_attention_layernorm(x)) + attn + x
        x = x + attn
        return self.mlp(self.post_attention_layernorm(x)) + x


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        rows = _vocab_rows(cfg, tp)
        # Built empty: every path fills it (a checkpoint, or the trainer's init), and nn.Embedding's
        # own normal_ init costs each process a ~1 s import of torch._dynamo.
        self.embed_tokens = nn.Embedding(rows, cfg.hidden_size, _weight=torch.empty(rows, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = make_norm(cfg, cfg.hidden_size)


def _vocab_rows(cfg: ModelConfig, tp: TensorParallel | None) -> int:
    if tp is None:
        return cfg.vocab_size
    lo, hi = tp.vocab_span(cfg.vocab_size)
    return hi - lo


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        """tp: this process's rank of a tensor-parallel model, whose `cfg` is the rank's own
        (kaki.tp.shard.local_config); None for the whole model in one process."""
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"hidden_act {cfg.hidden_act!r} is not supported; kaki knows "
                                  f"{', '.join(ACTIVATIONS)}")
        self.config = cfg
        self.tp = tp
        self.model = Decoder(cfg, tp)
        self.lm_head = Linear(cfg.hidden_size, _vocab_rows(cfg, tp), bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    # From the input embedding, which is never quantized (a quantized lm_head's `weight` is int8).
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Rotary frequencies, always fp32 (a bf16 inv_freq shifts logits by ~1e-2)."""
        if device not in self._inv_freq:
            cfg, rot = self.config, self.config.rotary_ndims
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float, device=device) / rot))
            self._inv_freq[device] = _scale_rope(inv, cfg.rope_scaling)
        return self._inv_freq[device]

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # (B, S, R/2)
        # Each angle serves one pair of dims: (j, j + R/2) in NeoX's layout, (2j, 2j + 1) in GPT-J's.
        if self.config.rotary_interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)  # (B, S, R)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, R)
        # Rounded to the model dtype before use, as transformers does.
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, S, R)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: AttentionCache | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder on `input_ids` (B, S) and return final-norm hidden states (B, S, H).

        positions: (B, S) rotary positions; default counts on from the cache (or from 0).
        valid: (B, S) True for real tokens, False for padding; None means all real.
        With a cache, the tokens are appended to what its rows hold (see AttentionCache).
        """
        if cache is not None:
            positions, mask, causal = cache.begin(input_ids, positions, valid)
        else:
            B, S = input_ids.shape
            if positions is None:
                positions = torch.arange(S, device=input_ids.device).expand(B, S)
            mask, causal = None, S > 1
            if valid is not None and not bool(valid.all()):
                mask, causal = attention_mask(B, S, 0, valid, input_ids.device), False
        x = self.embed(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask, causal)
        if cache is not None:
            cache.end()
        return self.model.final_layernorm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(input_ids)
        return self.tp.embed(input_ids, self.model.embed_tokens.weight, self.config.vocab_size)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The lm_head; under tensor parallelism every rank gets the full vocabulary's logits."""
        out = self.lm_head(h)
        return out if self.tp is None else self.tp.gather_vocab(out, self.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: AttentionCache | None = None, valid: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, S, V), or (B, 1, V) for the last position only (what decoding needs)."""
        with small_m.step(self, input_ids.numel()):
            h = self.hidden_states(input_ids, positions, cache, valid)
            if last_only:
                # As a 2-D (B, H) matrix: a (B, 1, H) view of (B, S, H) sends F.linear down a bmm
                # path that copies the whole lm_head weight (100x slower in bf16).
                return self.logits(h[:, -1])[:, None]
            return self.logits(h)


def _scale_rope(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, blended, scaled)
    raise CheckpointError(f"rope scaling {kind!r} is not supported")
