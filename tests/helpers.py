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
    # rotary_dim 8 of head_dim 16: partial interleaved rotary, as GPT-J-6B's 64 of 256.
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=320, rotary_dim=8),
}
FAMILIES = list(FAMILY_CONFIGS)
PAD, BOS, EOS = 0, 1, 2


def hf_config(family: str, **overrides):
    import transformers as T

    cls = {"persimmon": T.PersimmonConfig, "gpt_neox": T.GPTNeoXConfig, "llama": T.LlamaConfig,
           "gptj": T.GPTJConfig}[family]
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
            if "norm" in name or ".ln_" in name:  # GPT-J's norms are ln_1 and ln_f
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


def write_chat_jsonl(path: Path, n_lines: int = 120, seed: int = 1) -> Path:
    """Chat records (one user line, one assistant line each) from `corpus`, as training data."""
    lines = corpus(n_lines, seed=seed)
    recs = [{"messages": [{"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}
            for i in range(0, n_lines - 1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


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


def write_bpe_tokenizer(out_dir: Path, style: str, tokenizer_config: dict, bos_in_post_processor: bool) -> Path:
    """A tokenizer.json trained here with the `tokenizers` library, plus tokenizer_config.json.

    style "bytelevel": GPT-NeoX / Llama-3 style byte-level BPE, BOS/EOS "<|endoftext|>".
    style "metaspace": Llama-2 style BPE over "▁"-marked words with <0xNN> byte fallback,
    BOS "<s>", EOS "</s>". `bos_in_post_processor` puts a TemplateProcessing that prepends BOS
    into tokenizer.json itself (Llama 3 and Llama 2 both ship one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if style == "bytelevel":
        specials = ["<|endoftext|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus(), trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif style == "metaspace":
        specials = ["<unk>", "<s>", "</s>"]
        byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        # Byte pieces must be ordinary vocabulary entries (byte fallback looks them up there), so
        # they are trained in as "special" and then demoted from the added-token list below.
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_pieces)
        tok.train_from_iterator(corpus(), trainer)
    else:
        raise ValueError(style)
    bos = specials[0] if style == "bytelevel" else "<s>"
    if bos_in_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    raw = json.loads(tok.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] in specials]
    (out_dir / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out_dir


def prefer_text_pieces(hf_model, spm_proto: bytes) -> None:
    """Zero the lm_head rows of byte-fallback, control and unknown pieces, so greedy decoding of a
    random model picks word pieces (whose logits are spread around 0 and have a clear positive
    maximum) and its output decodes to readable text for text-level tests."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_proto)
    rows = [i for i in range(sp.get_piece_size()) if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)]
    head = hf_model.get_output_embeddings().weight
    with torch.no_grad():
        head[rows] = 0
