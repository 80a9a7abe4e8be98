"""Tiny random transformers models and tokenizers written to disk, for comparing kaki against the
reference implementations (transformers, sentencepiece, tokenizers)."""

from __future__ import annotations

import io
import json
import random
import shutil
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
FAMILIES = list(FAMILY_CONFIGS)
PAD, BOS, EOS = 0, 1, 2


def hf_config(family: str, **overrides):
    import transformers as T

    cls = {"persimmon": T.PersimmonConfig, "gpt_neox": T.GPTNeoXConfig, "llama": T.LlamaConfig}[family]
    kw = dict(FAMILY_CONFIGS[family], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
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


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a tokenizer directory's files (not config.json) into a model directory."""
    for f in Path(src).iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copyfile(f, Path(dst) / f.name)


def hf_model_dir(family: str, path: Path, tokenizer_dir: Path, seed: int = 0, **overrides):
    """A tiny random transformers model saved to `path` with a tokenizer next to it, so that
    `kaki.load(path)` (which loads the tokenizer too) works. Returns (hf_model, path)."""
    model = make_hf_model(family, seed=seed, **overrides)
    path = Path(path)
    model.save_pretrained(path)
    copy_tokenizer(tokenizer_dir, path)
    return model, path


# ----------------------------------------------------------------------------- batches


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 320) -> list[list[int]]:
    """Token-id prompts of the given lengths, avoiding the pad/bos/eos ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) as transformers' tokenizer with padding_side='left' gives."""
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    return ids, mask


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' generate derives them from the attention mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


# ----------------------------------------------------------------------------- tokenizers

_WORDS = ("the a of and to in is was he for it with as his on be at by had are but from or have an "
          "they which one you were her all she there would their we him been has when who will more "
          "no if out so said what up its about into than them can only other new some could time "
          "these two may then do first any my now such like our over man me even most made after "
          "also did many before must through back years where much your way well down should "
          "because each just those people how too little state good very make world still own see "
          "men work long get here between both life being under never day same another know while "
          "last might us great old year off come since against go came right used take three").split()


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """A few KB of English-like lines, generated so no data file or download is needed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def train_sentencepiece(vocab_size: int = 320) -> bytes:
    """A Unigram sentencepiece model with byte fallback, as Persimmon's is: characters it never saw
    (emoji, CJK) become <0xNN> byte pieces. Identity normalization keeps newlines and runs of
    spaces, so decode(encode(text)) == text."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1,
        num_threads=1, minloglevel=2)
    return out.getvalue()


def write_spm_tokenizer(out_dir: Path, model_proto: bytes, add_bos: bool = True) -> Path:
    """tokenizer.model + tokenizer_config.json, the layout of Persimmon's published checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model_proto)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False,
    }))
    return out_dir
