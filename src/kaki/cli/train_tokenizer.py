"""`kaki train-tokenizer`: train a sentencepiece Unigram tokenizer (byte fallback) on text files."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train-tokenizer", help="train a sentencepiece Unigram tokenizer with byte fallback",
        description="Train a sentencepiece Unigram tokenizer (byte fallback, whitespace kept exactly) "
                    "on text files (.jsonl: the `text` or `messages` fields; anything else: the whole "
                    "file) and write tokenizer.model + tokenizer_config.json to --out.")
    p.add_argument("files", nargs="+", metavar="FILE", help="training text files")
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary (e.g. 8000)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--unk-token", default="<unk>", help="unknown piece, id 0 (default <unk>)")
    p.add_argument("--bos-token", default="<s>",
                   help="beginning-of-text piece, id 1 (default <s>; 'none' for no BOS)")
    p.add_argument("--eos-token", default="</s>",
                   help="end-of-text piece, id 2 (default </s>; equal to --bos-token gives one "
                        "|ENDOFTEXT|-style token, as Persimmon has)")
    p.add_argument("--pad-token", default="none", help="padding piece (default none: training packs)")
    p.add_argument("--no-add-bos", dest="add_bos", action="store_false",
                   help="do not prepend BOS when encoding (tokenizer_config add_bos_token=false)")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                   help="let numbers merge into multi-digit pieces")
    p.add_argument("--user-symbol", action="append", default=[], metavar="TEXT",
                   help="a string that is always one piece (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when the text is subsampled")
    p.set_defaults(func=run)


def run(args) -> int:
    from kaki.tokenizer import Tokenizer
    from kaki.train.tokenizer_train import train_tokenizer

    none = lambda v: None if v is None or v.lower() == "none" else v  # noqa: E731
    out = train_tokenizer(args.files, args.vocab_size, args.out, unk_token=args.unk_token,
                          bos_token=none(args.bos_token), eos_token=args.eos_token,
                          pad_token=none(args.pad_token), add_bos=args.add_bos,
                          split_digits=args.split_digits, user_symbols=args.user_symbol, seed=args.seed)
    tok = Tokenizer.from_dir(out)
    print(f"wrote {out} ({tok.vocab_size} pieces; bos={tok.bos_id} eos={tok.eos_ids} "
          f"add_bos={tok.add_bos})")
    return 0
