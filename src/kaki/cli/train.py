"""`kaki train`: pretraining, full fine-tuning and LoRA, one process or many under torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

EPILOG = """\
examples:
  kaki train --model DIR --data chat.jsonl --out runs/ft --max-steps 500
  kaki train --init-from-config config.json --tokenizer tok/ --data a.jsonl:3,b.jsonl:1 --out runs/pt
  kaki train --config train.yaml --resume
  kaki train --model DIR --data d.jsonl --out runs/qlora --lora --quantize int4 --activation-checkpointing
  kaki train --model benchmarks/persimmon-8b --lora --quantize int4 --seq-len 2048 --batch-size 1 \
      --activation-checkpointing --dry-run          # the memory table, from config.json alone
  torchrun --nproc-per-node 2 -m kaki train --model DIR --data d.jsonl --out runs/ddp [--fsdp]
multi-node: torchrun --nnodes N --node-rank I --rdzv-endpoint HOST:PORT --nproc-per-node G -m kaki train ...
  kaki train --task sequence-classification --model DIR --data labelled.jsonl --out runs/clf [--lora]
  kaki train --task token-classification --model DIR --data tagged.jsonl --out runs/ner
data: JSONL, {"text": ...} or {"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}
classification data: {"text": ..., "label": NAME | ID | 0.7 (regression) | [NAMES] (multi-label)} or
  {"tokens": [words], "labels": [one per word]}; --labels a,b,c fixes the label order. The output
  is a transformers *ForSequenceClassification / *ForTokenClassification directory (kaki classify).
global batch = --batch-size x --grad-accum x processes sequences of --seq-len tokens.
"""


def register(sub) -> None:
    from kaki.train.options import add_arguments

    p = sub.add_parser("train", help="pretrain, fine-tune or LoRA-tune a model",
                       description="Train a model on JSONL data: pretraining from a config "
                                   "(--init-from-config), full fine-tuning or LoRA (--lora) of --model. "
                                   "Writes resumable checkpoints, metrics.jsonl, loss.png and the final "
                                   "model to --out.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from kaki.cli.common import default_model
    from kaki.train.base import DEFAULT_BATCH
    from kaki.train.loop import TrainingInterrupted
    from kaki.train.options import FIELDS, from_sources
    from kaki.train.run import train

    cli = {k: v for k, v in vars(args).items() if k in FIELDS}
    options = from_sources(cli, getattr(args, "config", None))
    if not options.model and not options.init_from_config:
        # As every model-loading command: $KAKI_MODEL, else the bundled model.
        options = dataclasses.replace(options, model=default_model())
    if options.dry_run:
        from kaki.train.memory import dry_run
        # No data is read for the table: the default micro-batch stands (a real run may pick fewer).
        p = dry_run(dataclasses.replace(options, batch_size=options.batch_size or DEFAULT_BATCH))
        print(p.table())
        return 0
    try:
        train(options)
    except TrainingInterrupted as e:
        print(f"kaki train: interrupted; checkpoint at step {e.step} in {e.path}. Resume with:\n"
              f"  {resume_command(cli, getattr(args, 'config', None))}", file=sys.stderr)
        return 130
    return 0


def resume_command(cli: dict, config: str | None) -> str:
    """The command line that continues the run: the flags given (not the defaults) and --resume."""
    words = ["kaki", "train"] + (["--config", config] if config else [])
    for name, value in {**cli, "resume": True}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return shlex.join(words)
