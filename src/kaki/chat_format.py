"""Chat formats and the retrieved-context block: how a conversation becomes the model's text.

One module that chat, serve, retrieval, evaluation and training share, so a model sees at
inference exactly the text it was trained on.

Formats (messages are `{"role": "system"|"user"|"assistant", "content": str}`):

- `adept`: Persimmon's chat format (the seed README). One exchange is
  `human: {prompt}\\n\\nadept: {reply}`; a follow-up is
  `human: {prompt}\\n\\nadept: {output}\\n\\nhuman: {follow_up}\\n\\nadept:` (the README's
  footnote). Persimmon has no system role: a system text is a leading paragraph,
  `{system}\\n\\nhuman: ...`, which is also what `kaki train` renders.
- `openchatkit`: what OpenChatKit's `bot.py` builds: `<human>: {q}\\n<bot>:` per question, the
  reply appended after `<bot>:` followed by `\\n`. A system text is a leading paragraph,
  `{system}\\n\\n`, where OpenChatKit puts its "Current Date/Time" pre-prompt.
- `template`: the tokenizer's `chat_template` (tokenizer_config.json), rendered by a sandboxed
  jinja2 environment with transformers' variables (`messages`, `add_generation_prompt`,
  `bos_token`, `eos_token`) and options (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`).
- `plain`: no role markers: the messages' texts separated by a blank line; the generation prompt
  is that blank line, so a reply starts a new paragraph, as it does in the rendered history.

`auto` = `template` when the model directory has a chat_template, else `adept` for persimmon,
`openchatkit` for gpt_neox, `plain` for anything else.

A reply's training span starts right after the assistant marker (`adept:`/`<bot>:`), so the space
the model writes first is trained too: at inference the prompt ends with the marker.

The retrieved-context block (the one format `kaki chat --retrieval`, the server and the demo
model's training data use) sits at the start of the user's turn, before the question:

    Context:
    [1] {title of passage 1}
    {text of passage 1}

    [2] {title of passage 2}
    {text of passage 2}

    Question: {the user's question}

A passage's title is one line (it names the source); its text has no blank line (runs of blank
lines are folded to one newline), so blank lines only ever separate passages.
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from kaki.errors import KakiError

FORMATS = ("auto", "adept", "openchatkit", "template", "plain")
ROLES = ("system", "user", "assistant")
# Other spellings seen in chat data, mapped to the three roles.
ROLE_ALIASES = {"human": "user", "adept": "assistant", "bot": "assistant", "model": "assistant"}


def check_text(text: str, what: str) -> None:
    """Refuse a string no tokenizer can encode: a lone surrogate ("\\ud800", which JSON allows)
    is not Unicode text, and sentencepiece fails on it with no word of where it came from."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise KakiError(f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
                        "which is not text; remove it") from None


def normalize_messages(messages: Iterable[dict]) -> list[dict]:
    """Messages with canonical roles; a clear error for anything that is not a message."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise KakiError(f"message {i} must be an object with string `role` and `content`, got "
                            f"{reprlib.repr(m)}")
        role = ROLE_ALIASES.get(m["role"], m["role"])
        if role not in ROLES:
            raise KakiError(f"message {i} has role {reprlib.repr(m['role'])}; use system, user or assistant")
        check_text(m["content"], f"message {i}'s content")
        if role == "system" and i != 0:
            raise KakiError(f"message {i} is a system message; only the first message may be one")
        out.append({"role": role, "content": m["content"]})
    return out


@dataclass
class ChatFormat:
    """Turn markers of a line-based chat format (adept, openchatkit, plain)."""

    name: str
    user_prefix: str  # text before a user message
    assistant_prefix: str  # text before a reply; the generation prompt ends with it
    user_suffix: str = ""  # text after a user message
    assistant_suffix: str = ""  # text after a reply
    separator: str = ""  # between turns
    system_suffix: str = "\n\n"  # after a leading system paragraph
    stop: list[str] = field(default_factory=list)  # a reply ends where one of these appears
    # Whether the rendered text should be encoded with the tokenizer's BOS (None: its default).
    add_bos: bool | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.render_with_spans(messages, add_generation_prompt)[0]

    def render_with_spans(self, messages: list[dict], add_generation_prompt: bool = False
                          ) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character spans [start, end) of the assistant replies (for loss
        masking). With add_generation_prompt, the text ends with the reply marker."""
        msgs = normalize_messages(messages)
        out: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0

        def put(s: str) -> None:
            nonlocal pos
            out.append(s)
            pos += len(s)

        turns = msgs
        if msgs and msgs[0]["role"] == "system":
            if msgs[0]["content"]:
                put(msgs[0]["content"] + self.system_suffix)
            turns = msgs[1:]
        for i, m in enumerate(turns):
            if i:
                put(self.separator)
            if m["role"] == "user":
                put(self.user_prefix + m["content"] + self.user_suffix)
            else:
                put(self.assistant_prefix)
                start = pos
                put(self._reply_text(m["content"]) + self.assistant_suffix)
                spans.append((start, pos))
        if add_generation_prompt and (not turns or turns[-1]["role"] == "user"):
            if turns:
                put(self.separator)
            put(self.assistant_prefix)
        return "".join(out), spans

    @property
    def reply_lead(self) -> str:
        """What the format puts between its reply marker and a reply: a generated reply starts
        with it, and front ends strip it to show the reply itself."""
        # The marker ends with ":" and the reply follows after one space, as in the seed's
        # examples; a plain-format reply is the text itself.
        return " " if self.assistant_prefix else ""

    def _reply_text(self, content: str) -> str:
        return self.reply_lead + content


class TemplateTooLarge(KakiError):
    """A chat_template's output (or a value on the way to it) is over kaki.jinja_sandbox.MAX_CHARS."""


class TemplateFormat:
    """A tokenizer's jinja2 `chat_template`, rendered as transformers renders it."""

    name = "template"

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "",
                 special_tokens: dict | None = None, where: str = "the tokenizer's chat_template"):
        from jinja2.exceptions import TemplateError

        from kaki.jinja_sandbox import BoundedSandbox

        def raise_exception(message):
            raise TemplateError(message)

        # The same environment options as transformers' apply_chat_template, so templates written
        # for it render identically; sandboxed, with bounded sizes and time, because templates
        # come with downloaded models (kaki.jinja_sandbox).
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.where = where
        if not isinstance(template, str):
            raise KakiError(f"{where} must be a string, got {type(template).__name__}")
        try:
            self.template = env.from_string(template)
        except (TemplateError, RecursionError, MemoryError, ValueError) as e:
            raise KakiError(f"{where} is not valid jinja2 ({type(e).__name__}: {str(e)[:300]}); fix "
                            "tokenizer_config.json or pass --chat-format adept|openchatkit|plain")
        self.source = template
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.special_tokens = dict(special_tokens or {})
        # The generation loop stops at the EOS token id; templates need no stop strings.
        self.stop: list[str] = []
        self.reply_lead = ""  # a template writes a reply right after its own generation prompt
        # A template that writes the BOS token itself must not get a second one from encode().
        self.add_bos = False if "bos_token" in template else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        from kaki.jinja_sandbox import RenderTooLarge, render
        msgs = normalize_messages(messages)
        try:
            return render(self.template, messages=msgs, add_generation_prompt=add_generation_prompt,
                          **{**self.special_tokens, "bos_token": self.bos_token, "eos_token": self.eos_token})
        except RenderTooLarge as e:
            raise TemplateTooLarge(f"{self.where} failed on these messages: {e}") from None
        except TemplateError as e:  # raise_exception() and the sandbox's refusals
            raise KakiError(f"{self.where} failed on these messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template is code from a model download: any failure is its own
            raise KakiError(f"{self.where} failed on these messages ({type(e).__name__}: "
                            f"{str(e)[:300]}); fix it in tokenizer_config.json or pass "
                            "--chat-format adept|openchatkit|plain") from None

    def render_with_spans(self, messages: list[dict], add_generation_prompt: bool = False
                          ) -> tuple[str, list[tuple[int, int]]]:
        """Spans found by rendering each prefix of the conversation: a reply starts where the
        conversation before it, rendered with its generation prompt, ends; it runs to the end of
        the reply's text plus an EOS token written right after it (the model must learn to stop)."""
        msgs = normalize_messages(messages)
        full = self.render(msgs, add_generation_prompt)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head = self.render(msgs[:i], add_generation_prompt=True)
            upto = self.render(msgs[:i + 1], add_generation_prompt=False)
            if not full.startswith(head) or not full.startswith(upto):
                raise KakiError("this chat_template renders a conversation differently from its "
                                "prefixes, so replies cannot be located for loss masking; use "
                                "--chat-format adept|openchatkit instead")
            at = upto.find(m["content"], len(head))
            if at < 0:
                raise KakiError(f"the chat_template does not write message {i}'s content verbatim")
            end = at + len(m["content"])
            if self.eos_token and upto.startswith(self.eos_token, end):
                end += len(self.eos_token)
            spans.append((len(head), end))
        return full, spans


ADEPT = ChatFormat("adept", user_prefix="human: ", assistant_prefix="adept:", separator="\n\n",
                   stop=["\n\nhuman:"])
OPENCHATKIT = ChatFormat("openchatkit", user_prefix="<human>: ", user_suffix="\n",
                         assistant_prefix="<bot>:", assistant_suffix="\n", stop=["\n<human>:"])
PLAIN = ChatFormat("plain", user_prefix="", assistant_prefix="", separator="\n\n")
FIXED = {"adept": ADEPT, "openchatkit": OPENCHATKIT, "plain": PLAIN}
# `auto` for a directory without a chat_template: the format each family's chat models were tuned on.
FAMILY_FORMAT = {"persimmon": "adept", "gpt_neox": "openchatkit"}


def get_format(name: str = "auto", *, model_type: str | None = None, chat_template=None,
               bos_token: str = "", eos_token: str = "", where: str = "the tokenizer's chat_template"
               ) -> ChatFormat | TemplateFormat:
    """The chat format called `name`; `auto` follows the rule in this module's docstring."""
    if name not in FORMATS:
        raise KakiError(f"unknown chat format {name!r}; choose one of {', '.join(FORMATS)}")
    template = _pick_template(chat_template)
    if name == "auto":
        if template:
            name = "template"
        else:
            name = FAMILY_FORMAT.get(model_type or "", "plain")
    if name == "template":
        if not template:
            raise KakiError("--chat-format template needs a `chat_template` in the model's "
                            "tokenizer_config.json, and this model has none; use adept, "
                            "openchatkit or plain")
        return TemplateFormat(template, bos_token, eos_token, where=where)
    return FIXED[name]


def _pick_template(chat_template) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (the
    `default` one is the chat template, as in transformers)."""
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        return named.get("default")
    return chat_template or None


def format_for_dir(model_dir: str | Path, name: str = "auto") -> ChatFormat | TemplateFormat:
    """The chat format of a model directory (config.json's model_type, tokenizer_config.json)."""
    d = Path(model_dir)
    cfg = _read_json(d / "config.json")
    tok = _read_json(d / "tokenizer_config.json")
    special = _read_json(d / "special_tokens_map.json")

    def token(key: str) -> str:
        v = tok.get(key) or special.get(key) or ""
        return v.get("content", "") if isinstance(v, dict) else str(v)

    return get_format(name, model_type=cfg.get("model_type"), chat_template=tok.get("chat_template"),
                      bos_token=token("bos_token"), eos_token=token("eos_token"),
                      where=f"the chat_template of {d / 'tokenizer_config.json'}")


def format_for_llm(llm, name: str = "auto") -> ChatFormat | TemplateFormat:
    """The chat format of a loaded `kaki.LLM` (its directory when it has one)."""
    if llm.path and Path(llm.path, "config.json").is_file():
        return format_for_dir(llm.path, name)
    tok = llm.tokenizer
    piece = lambda i: tok.id_to_piece(i) if i is not None else ""  # noqa: E731
    return get_format(name, model_type=llm.config.model_type, chat_template=tok.chat_template,
                      bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_ids[0] if tok.eos_ids else None))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KakiError(f"{path} is not valid JSON ({e})")


# ----------------------------------------------------------------------------- retrieved context

CONTEXT_HEADER = "Context:"
QUESTION_PREFIX = "Question: "
_PASSAGE_HEAD = re.compile(r"\[(\d+)\] ([^\n]*)\n")


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _no_blank_lines(s: str) -> str:
    """A passage's text with blank lines folded away (they separate passages in the block)."""
    lines = [ln.rstrip() for ln in s.strip().splitlines()]
    return "\n".join(ln for ln in lines if ln.strip())


def normalize_passage(p: dict) -> dict:
    """A passage as the context block holds it: `title` one line, `text` without blank lines."""
    if not isinstance(p, dict) or not isinstance(p.get("text"), str):
        raise KakiError(f"a passage must be an object with a string `text`, got {p!r}")
    return {"title": _one_line(str(p.get("title") or "untitled")), "text": _no_blank_lines(p["text"])}


def render_context(passages: list[dict]) -> str:
    """The context block for passages (dicts with `title` and `text`), best first; '' for none."""
    if not passages:
        return ""
    parts = [CONTEXT_HEADER]
    for i, p in enumerate(passages, 1):
        q = normalize_passage(p)
        parts.append(f"[{i}] {q['title']}\n{q['text']}")
    return parts[0] + "\n" + "\n\n".join(parts[1:])


def with_context(question: str, passages: list[dict]) -> str:
    """A user turn's content: the context block, then the question; the bare question when there
    are no passages (what the demo model sees without retrieval)."""
    if not passages:
        return question
    return render_context(passages) + "\n\n" + QUESTION_PREFIX + question


def parse_context(text: str) -> list[dict]:
    """The passages of the last context block in `text` (a user turn, or a whole rendered
    prompt), as `{"title", "text"}` dicts; [] when there is none. Inverse of render_context."""
    return split_context(text)[0]


def split_context(text: str) -> tuple[list[dict], str]:
    """(passages, question) of a user turn written by with_context; ([], text) without a block."""
    at = _last_block_start(text)
    if at < 0:
        return [], text
    body = text[at + len(CONTEXT_HEADER) + 1:]
    passages: list[dict] = []
    pos = 0
    while pos < len(body):
        end = body.find("\n\n", pos)
        chunk = body[pos:] if end < 0 else body[pos:end]
        m = _PASSAGE_HEAD.match(chunk)
        if not (m and int(m.group(1)) == len(passages) + 1):
            break
        passages.append({"title": m.group(2), "text": chunk[m.end():]})
        pos = len(body) if end < 0 else end + 2
    # What follows the passages is the question (after its prefix), up to the end of the turn.
    rest = body[pos:]
    question = rest[len(QUESTION_PREFIX):] if rest.startswith(QUESTION_PREFIX) else rest
    return passages, question


def _last_block_start(text: str) -> int:
    head = CONTEXT_HEADER + "\n[1] "
    at = text.rfind(head)
    while at > 0 and text[at - 1] not in "\n ":
        at = text.rfind(head, 0, at)
    return at


def fit_passages(passages: list[dict], budget_tokens: int, count_tokens: Callable[[str], int]) -> list[dict]:
    """As many passages as fit in `budget_tokens` (counted on the rendered context block, with
    the tokenizer's `count_tokens`), in their given (rank) order; a passage too long for what is
    left is skipped, and shorter later ones may still fit."""
    kept: list[dict] = []
    for p in passages:
        trial = kept + [p]
        if count_tokens(render_context(trial) + "\n\n" + QUESTION_PREFIX) <= budget_tokens:
            kept = trial
    return kept
