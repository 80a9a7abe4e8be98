"""The shell's slash commands: one function each, registered with its usage and help line.

A command is `fn(shell, arg) -> bool` (True quits). Adding one (e.g. `/sources` for
`--retrieval`) is one decorated function here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from kaki.citations import format_sources
from kaki.engine.speculative import summary as decode_summary
from kaki.errors import KakiError


@dataclass
class Command:
    name: str
    usage: str
    help: str
    fn: Callable
    aliases: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {}  # by name and alias, in /help order


def command(name: str, usage: str, help: str, aliases: tuple[str, ...] = ()):
    def register(fn: Callable) -> Callable:
        c = Command(name, usage, help, fn, aliases)
        for n in (name, *aliases):
            COMMANDS[n] = c
        return fn
    return register


def run_command(shell, line: str) -> bool:
    name, _, arg = line[1:].partition(" ")
    cmd = COMMANDS.get(name)
    if cmd is None:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean /{close[0]}? " if close else ""
        shell.error(f"unknown command /{name}; {hint}/help lists the commands "
                    "(to send a message that starts with '/', type '//')")
        return False
    try:
        return bool(cmd.fn(shell, arg.strip()))
    except KakiError as e:
        shell.error(str(e))
        return False


def _need(arg: str, usage: str) -> str:
    if not arg:
        raise KakiError(f"usage: {usage}")
    return arg


# ----------------------------------------------------------------------------- the commands

@command("help", "/help [COMMAND]", "list the commands, or show one", aliases=("?",))
def _help(shell, arg: str) -> None:
    if arg:
        cmd = COMMANDS.get(arg.lstrip("/"))
        if cmd is None:
            raise KakiError(f"no command /{arg.lstrip('/')}; /help lists them")
        shell.out(f"{cmd.usage}\n    {cmd.help}\n")
        if cmd.name == "set":
            shell.out(_settings_help(shell))
        return
    seen, lines = set(), []
    for cmd in COMMANDS.values():
        if cmd.name in seen:
            continue
        seen.add(cmd.name)
        lines.append(f"  {cmd.usage:<22} {cmd.help}")
    shell.out("Type a message to send it to the model. Commands:\n" + "\n".join(lines) + "\n"
              "Settings for /set:\n" + _settings_help(shell) +
              "Ctrl-C stops a reply; Ctrl-C or Ctrl-D at the prompt quits. A message that starts "
              "with '/' is typed as '//'.\n")


def _settings_help(shell) -> str:
    return "".join(f"  {k:<22} {h}\n" for k, h in shell.session.settings.HELP.items())


@command("quit", "/quit", "leave the chat (also Ctrl-D, or Ctrl-C at the prompt)", aliases=("exit",))
def _quit(shell, arg: str) -> bool:
    return True


@command("reset", "/reset", "forget the conversation (the system text and settings stay)")
def _reset(shell, arg: str) -> None:
    shell.session.reset()
    shell.note("conversation cleared")


@command("raw_prompt", "/raw_prompt", "show the exact text of the last prompt sent to the model")
def _raw_prompt(shell, arg: str) -> None:
    text = shell.session.last_prompt
    if text is None:
        raise KakiError("no prompt has been sent since the conversation last changed; send a message first")
    shell.out(text + "\n")


@command("sources", "/sources", "the retrieved passages the last answer was given (with --retrieval)")
def _sources(shell, arg: str) -> None:
    s = shell.session
    if s.retrieve is None:
        raise KakiError("no index in use; start the chat with --retrieval INDEX (see docs/retrieval.md)")
    asked = [t for t in s.turns if t.role == "user"]
    if not asked:
        raise KakiError("nothing asked yet; send a message first")
    shell.out(format_sources(asked[-1].passages) + "\n")


@command("raw_say", "/raw_say TEXT", "complete TEXT as it is: no chat format, not part of the conversation")
def _raw_say(shell, arg: str) -> None:
    text = _need(arg, "/raw_say TEXT")
    shell.show(lambda: shell.session.raw(text))


@command("set", "/set KEY VALUE", "change a setting now (see /hyperparameters)")
def _set(shell, arg: str) -> None:
    key, _, value = arg.partition(" ")
    if not key or not value.strip():
        raise KakiError("usage: /set KEY VALUE, with KEY one of " + ", ".join(shell.session.settings.HELP))
    shell.note(shell.session.settings.set(key, value.strip()))


@command("hyperparameters", "/hyperparameters", "show the settings /set changes", aliases=("settings",))
def _hyperparameters(shell, arg: str) -> None:
    s = shell.session.settings
    lines = []
    for k, v in s.items():
        shown = ("on" if v else "off") if k == "sample" else ("none" if v is None else v)
        lines.append(f"{k} = {shown}")
    if not s.sample:
        lines.append("(sampling is off: replies are greedy; /set sample on, or /set temperature T)")
    shell.out("\n".join(lines) + "\n")


@command("undo", "/undo", "drop the last exchange (your last message and its reply)")
def _undo(shell, arg: str) -> None:
    gone = shell.session.undo()
    shell.note(f"dropped the last exchange ({len(gone)} messages)" if gone else "nothing to undo")


@command("retry", "/retry", "generate the last reply again")
def _retry(shell, arg: str) -> None:
    shell.show(shell.session.retry)


@command("save", "/save FILE", "write the conversation as JSON (chat-completions `messages`)")
def _save(shell, arg: str) -> None:
    path = _need(arg, "/save FILE")
    try:
        written = shell.session.save(path)
    except OSError as e:
        raise KakiError(f"cannot write {path}: {e.strerror or e}") from None
    shell.note(f"saved {len(shell.session.messages())} messages to {written}")


@command("load", "/load FILE", "replace the conversation with one /save wrote (or any `messages` JSON)")
def _load(shell, arg: str) -> None:
    s = shell.session
    n = s.load(_need(arg, "/load FILE"))
    left_out = f"; the oldest {s.window} are outside the model's {s.context_length:,}-token context" \
        if s.window else ""
    shell.note(f"loaded {n} messages from {arg}{left_out}")


@command("stats", "/stats", "tokens in context, reuse of the KV cache, speed of the last reply, the prefix cache")
def _stats(shell, arg: str) -> None:
    s = shell.session
    r = s.last_reply
    lines = [f"context: {s.context_tokens:,} of {s.context_length:,} tokens; "
             f"{len(s.turns) - s.window} of {len(s.turns)} messages in the window, {s.window} left out"]
    if r is not None:
        st = r.stats
        lines.append(f"last prompt: {st.prompt_tokens:,} tokens, {st.reused_tokens:,} reused from the KV cache, "
                     f"{st.processed_tokens:,} processed")
        lines.append(f"last reply: {st.new_tokens:,} tokens in {st.total_s:.2f} s ({st.tokens_per_s:.1f} tokens/s), "
                     f"first token after {st.first_token_s:.3f} s, ended by {r.finish_reason}")
        if st.decode_steps:
            lines.append(f"last reply's decoding: {decode_summary(vars(st))}")
    lines.append(f"prompt tokens processed this session: {s.total_processed:,}")
    pc = s.prefix_cache
    if pc is not None:
        c = pc.counters()
        lines.append(f"prefix cache: {c['prefix_hit_tokens']:,} hit tokens, {c['prefix_evictions']:,} evictions, "
                     f"{pc.blocks * pc.block_size:,} tokens kept ({c['prefix_bytes'] / 2**20:.1f} of "
                     f"{c['prefix_budget_bytes'] / 2**20:.1f} MiB)")
    if s.moderator is not None:
        checks = ", ".join(f"{'message' if where == 'input' else 'reply'} {v.label} {v.score:.2f}"
                           + (" blocked" if v.blocked else "") for where, v in s.last_checks.items())
        lines.append(f"moderation: {s.moderator.describe()}; last checked: {checks or 'nothing yet'}")
    shell.out("\n".join(lines) + "\n")
