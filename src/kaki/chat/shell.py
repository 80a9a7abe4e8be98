"""The `kaki chat` REPL: read a line, send it (or run a /command), stream the reply.

Replies and what a command was asked to show (/raw_prompt, /stats, ...) go to stdout; notices
(a reply cut at max_new_tokens, a stopped reply, trimmed context, errors) go to stderr, so
`printf 'Hello\\n/quit\\n' | kaki chat > replies.txt` keeps only the replies. With a terminal on
stdin, readline gives line editing and history; from a pipe, lines are read plainly and no
prompt is printed.

Ctrl-C during a reply stops that reply and keeps the shell; Ctrl-C or Ctrl-D at the prompt quits.

With retrieval, each grounded reply is followed by its sources, one line per passage the model was
given (title and docs URL, or path and line). With `--echo`, each message read from a pipe is
printed (`>>> message`) before its reply, so a transcript reads as questions and answers.

With a moderator (`--moderation`) replies are not streamed: a reply is printed once it has been
checked, since text already on the screen cannot be taken back.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from kaki.chat.commands import run_command
from kaki.chat.session import ChatSession, Refusal, Reply
from kaki.errors import KakiError
from kaki.citations import format_citations

PROMPT = ">>> "


class ChatShell:
    def __init__(self, session: ChatSession, stream: bool = True, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None, echo: bool = False):
        """`echo`: print each message read from a pipe before its reply (`>>> message`), so a
        transcript shows questions and answers together."""
        self.session = session
        self.stream = stream and session.moderator is None
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty()
        self.echo = echo and not self.interactive  # a terminal shows what was typed already
        session.notify = self.note

    # ------------------------------------------------------------------------- output

    def out(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def note(self, text: str) -> None:
        """A notice for the person at the shell (stderr, after whatever stdout still holds)."""
        self.stdout.flush()
        self.stderr.write(f"[{text}]\n")
        self.stderr.flush()

    # ------------------------------------------------------------------------- the loop

    def run(self, banner: str | None = None) -> int:
        if self.interactive:
            try:
                import readline  # noqa: F401  (importing it gives input() line editing and history)
            except ImportError:  # Windows' Python has none; input() still works, without editing
                pass
            if banner:
                self.note(banner)
        while True:
            try:
                line = self.read_line()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
                if self.interactive:
                    self.out("\n")
                return 0
            try:
                if self.handle(line):
                    return 0
            except KeyboardInterrupt:  # Ctrl-C outside a reply (a slow /load, say): back to the prompt
                self.note("stopped")

    def read_line(self) -> str:
        if self.interactive:
            return input(PROMPT)
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def handle(self, line: str) -> bool:
        """Act on one input line; True means quit."""
        if not line.strip():
            return False  # an empty line sends nothing
        if line.startswith("/") and not line.startswith("//"):
            return run_command(self, line)
        text = line[1:] if line.startswith("//") else line  # "//x" sends the message "/x"
        if self.echo:
            self.out(PROMPT + line + "\n")
        reply = self.show(lambda: self.session.say(text))
        self.cite(reply)
        return False

    def cite(self, reply) -> None:
        """Under a reply grounded in retrieved passages: one line per passage the model was given
        (title and docs URL or path:line), so the user can check the answer or read on."""
        if reply is None or self.session.retrieve is None or reply.finish_reason in ("content_filter",):
            return
        asked = [t for t in self.session.turns if t.role == "user"]
        if asked and asked[-1].passages:
            self.out(format_citations(asked[-1].passages) + "\n")

    def show(self, make_reply: Callable[[], Reply | Refusal]) -> Reply | Refusal | None:
        """Start a reply and print it (streamed unless --no-stream); Ctrl-C stops it."""
        try:
            reply = make_reply()
        except KakiError as e:
            self.error(str(e))
            return None
        try:
            if self.stream:
                for piece in reply:
                    self.out(piece)
            else:
                reply.run()
                self.out(reply.text)
        except KeyboardInterrupt:
            reply.stop()  # ends it as "interrupted" (a no-op if it had already ended)
            if not self.stream:
                self.out(reply.text)
        self.out("\n")
        if reply.finish_reason == "content_filter":
            where, verdict = reply.moderation
            self.note(f"{'your message' if where == 'input' else 'the reply'} was blocked by moderation "
                      f"({verdict.label}, {verdict.score:.2f}); the exchange is not kept")
        elif reply.finish_reason == "interrupted":
            self.note("stopped")
        elif reply.finish_reason == "length":
            self.note(f"cut at max_new_tokens={reply.max_new_tokens}; /set max_new_tokens N for longer replies")
        return reply

    def error(self, text: str) -> None:
        self.stdout.flush()
        self.stderr.write(f"error: {text}\n")
        self.stderr.flush()
