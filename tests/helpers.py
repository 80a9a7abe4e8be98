"""Tiny random transformers models written to disk, for comparing kaki against the reference."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_CONFIGS = {
    "persimmon": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256, vocab_size=320, qk_layernorm=True,
                      partial_rotary_factor=0.5, rope_theta=25000.0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, vocab_size=320, rotary_pct=0.25, use_parallel_residual=True),
    "llama": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, vocab_size=320),
}


def hf_config(family: str, **overrides):
    import transformers as T

    cls = {"persimmon": T.PersimmonConfig, "gpt_neox": T.GPTNeoXConfig, "llama": T.LlamaConfig}[family]
    kw = dict(FAMILY_CONFIGS[family], bos_token_id=1, eos_token_id=2, pad_token_id=0,
              initializer_range=0.2)
    kw.update(overrides)
    return cls(**kw)


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random model with weights scaled up (initializer 0.2, random norms) so logits are far from
    flat and greedy ties are rare."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path
