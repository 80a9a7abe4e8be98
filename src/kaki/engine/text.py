"""The text edge of one sequence: the scheduler's events in, text pieces out.

Incremental detokenization and stop strings are `kaki.tokenizer.TextStream`'s; this adds what
every front end did around it: push each event's token, release the held-back tail on the last
event, and say when a stop string ended the sequence (the caller then ends it in the scheduler:
`Scheduler.abort(seq, "stop")`). It also keeps the token ids and logprobs the events carried.
"""

from __future__ import annotations

from kaki.engine.scheduler import Event
from kaki.tokenizer import TextStream, Tokenizer


class TextSequence:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None):
        self.stream = TextStream(tokenizer, prompt_ids, stop)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def text(self) -> str:
        """Everything released so far (all of the reply once it has finished)."""
        return self.stream.text

    @property
    def stopped(self) -> bool:
        """A stop string ended the text: end the sequence in the scheduler too."""
        return self.stream.stopped

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, event: Event) -> str:
        """The text `event` releases ('' while TextStream holds back, or once finished)."""
        if self.finished:
            return ""  # the scheduler's report of an end the text already made
        piece = ""
        if event.token is not None:
            self.token_ids.append(event.token)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
            if event.top is not None:
                self.top_logprobs.append(event.top)
            # A token that ends its sequence as "stop" is an eos or stop id: kept in the ids, not
            # shown in the text (as OpenAI's and vLLM's servers do).
            if event.finish_reason != "stop":
                piece = self.stream.push(event.token)
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error
            piece += self.stream.finish()
        elif self.stream.stopped:
            self.finish_reason = "stop"
        return piece
