"""The `kaki` command: one subcommand per module, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# kaki's notes on a terminal are sentences for the user, not a debug trace: loguru's default
# handler (made when loguru is first imported, below this line) prints only the message, not a
# timestamp and module path; and from INFO up (loguru's default is DEBUG: which kernel build was
# probed is for LOGURU_LEVEL=DEBUG). LOGURU_FORMAT/LOGURU_LEVEL set by the user still win.
os.environ.setdefault("LOGURU_FORMAT", "{message}")
os.environ.setdefault("LOGURU_LEVEL", "INFO")

from kaki.errors import KakiError, RankLost  # noqa: E402

# Modules that define a subcommand; each adds its parser and sets `func`.
COMMANDS = ["kaki.cli.generate", "kaki.cli.info", "kaki.cli.train_tokenizer", "kaki.cli.train", "kaki.cli.convert",
            "kaki.cli.merge_lora", "kaki.cli.eval", "kaki.cli.serve",
            "kaki.cli.chat", "kaki.cli.index", "kaki.cli.classify"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="kaki", description="Run, serve, chat with and fine-tune Persimmon-class models.")
    parser.add_argument("--version", action="version", version=f"kaki {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from kaki import __version__
    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KakiError as e:
        print(f"kaki {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RankLost as e:
        print(f"kaki {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
