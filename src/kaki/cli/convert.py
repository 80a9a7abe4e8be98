"""`kaki convert SRC DST --to hf|adept`: Adept's Megatron release <-> a transformers directory."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert a Persimmon model between Adept's release layout and transformers'",
        description="Convert Adept's Persimmon release (latest_checkpointed_iteration.txt, adept_vocab.model, "
                    "iter_N/mp_rank_00/model_optim_rng.pt) to a transformers directory, or a transformers "
                    "Persimmon directory (or a release) to the release layout. Tensors are streamed one by one.")
    p.add_argument("src", metavar="SRC", help="release directory or transformers Persimmon directory")
    p.add_argument("dst", metavar="DST", help="directory to write (replaced atomically if it exists)")
    p.add_argument("--to", default=None, choices=["hf", "adept"],
                   help="hf: transformers (safetensors + config.json + tokenizer); adept: Megatron release "
                        "(required unless --quantize, which writes hf)")
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="write a quantized transformers directory: int8, int4 or int4:GROUP (safetensors with "
                        "the scales, quantization_config in config.json; kaki loads it without re-quantizing)")
    p.add_argument("--no-quantize-head", dest="quantize_head", action="store_false",
                   help="with --quantize, keep the lm_head in floating point")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: as stored in SRC)")
    p.add_argument("--trim-vocab", action="store_true",
                   help="drop embedding rows the tokenizer can never produce (unused/control pieces, padding)")
    p.add_argument("--vocab-multiple", type=int, default=None, metavar="N",
                   help="with --trim-vocab, keep a multiple of N rows (default 128, Megatron's padding)")
    p.add_argument("--iteration", type=int, default=None,
                   help="with --to adept, the iteration number to record (default: SRC's, else 1)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="with --to adept, write Megatron's tensor-parallel split: N mp_rank_XX folders, each "
                        "rank's heads, MLP units and vocabulary block (loads at N ranks, or merged at fewer)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def run(args) -> int:
    from kaki.adept.convert import (embedding_bytes_saved, parse_dtype, read_source, write_release,
                                    write_transformers)
    from kaki.adept.vocab_trim import VOCAB_MULTIPLE, trim_vocab
    from kaki.errors import KakiError

    if args.quantize is not None:
        return run_quantize(args)
    if args.to is None:
        raise KakiError("kaki convert needs --to hf or --to adept (or --quantize FORMAT)")
    if args.vocab_multiple is not None and not args.trim_vocab:
        raise KakiError("--vocab-multiple only applies with --trim-vocab")
    if args.iteration is not None and args.to != "adept":
        raise KakiError("--iteration only applies with --to adept")
    if args.tensor_parallel != 1 and args.to != "adept":
        raise KakiError("--tensor-parallel only applies with --to adept (a transformers directory is never split)")
    if args.tensor_parallel < 1:
        raise KakiError(f"--tensor-parallel must be >= 1, not {args.tensor_parallel}")
    dtype = parse_dtype(args.dtype)
    bundle = read_source(args.src)
    if args.trim_vocab:
        trimmed, plan = trim_vocab(bundle, args.vocab_multiple or VOCAB_MULTIPLE)
        saved = embedding_bytes_saved(bundle, trimmed, dtype)
        if plan.removed == 0:
            print(f"trim-vocab: every one of the {plan.rows:,} ids can be produced by the tokenizer "
                  "(or is needed to round to the vocab multiple); nothing removed", file=sys.stderr)
        else:
            why = ", ".join(f"{n:,} {reason}" for reason, n in plan.dropped.items())
            how = ("truncated (ids unchanged)" if plan.truncation
                   else "tokenizer rewritten, ids renumbered (map in vocab_map.json)")
            print(f"trim-vocab: {plan.rows:,} -> {len(plan.keep):,} rows ({why}); {how}; "
                  f"saved {saved:,} bytes ({_size(saved)})", file=sys.stderr)
        bundle = trimmed
    progress = _progress(args)
    if args.to == "hf":
        out = write_transformers(bundle, args.dst, dtype, progress=progress)
    else:
        out = write_release(bundle, args.dst, dtype, progress=progress, iteration=args.iteration,
                            tensor_parallel=args.tensor_parallel)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    kind = "transformers Persimmon directory" if args.to == "hf" else "Adept/Megatron release"
    print(f"wrote {out} ({kind}, {_size(total)})")
    return 0


def _progress(args) -> bool:
    """A bar only on a terminal: piped or logged, its \\r redraws are noise in the file."""
    return not args.quiet and sys.stderr.isatty()


def run_quantize(args) -> int:
    from kaki.errors import KakiError
    from kaki.quant import as_spec
    from kaki.quant.convert import write_quantized

    if args.to == "adept":
        raise KakiError("--quantize writes a transformers directory; Adept's release layout has no quantized form")
    if args.trim_vocab or args.iteration is not None or args.tensor_parallel != 1:
        raise KakiError("--trim-vocab, --iteration and --tensor-parallel do not combine with --quantize; trim "
                        "first, then quantize (a quantized model splits over ranks when it loads)")
    spec = as_spec(args.quantize, args.quantize_head)
    out = write_quantized(args.src, args.dst, spec, args.dtype, progress=_progress(args))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({spec.format} transformers directory, {_size(total)})")
    return 0
