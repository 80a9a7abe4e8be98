"""A jinja2 sandbox for chat templates that also bounds what a template may cost.

Chat templates come inside downloaded models. jinja2's sandbox stops them reaching Python's
internals, but not from asking for a 10 GB string (`'a' * 10**10`), a huge number
(`10 ** 10 ** 10`), a padded format (`'{:>9999999999}'.format(1)`) or a loop that never ends.
On top of the sandbox this one:

- checks `*`, `**`, `+`, `%` and `~` before computing them: no string or list above MAX_CHARS, no
  integer above MAX_INT_BITS;
- refuses integer arguments above MAX_CHARS to any call or filter (widths, repeat counts), and
  `range` past MAX_RANGE items;
- refuses `str.format_map` and format strings with huge widths;
- stops a render that runs past MAX_SECONDS (checked at every call, attribute, operator and
  loop step) or writes past MAX_CHARS.

Each refusal raises jinja2's SecurityError; kaki.chat_format turns every failure into a KakiError.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Any, Iterable, Iterator

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

# A rendered conversation longer than this is no prompt any model takes (tokens are ~4 chars).
MAX_CHARS = 8 << 20
MAX_INT_BITS = 4096
MAX_RANGE = 100_000
# Real templates render in milliseconds; this only stops runaway loops.
MAX_SECONDS = 5.0
# A width or precision of 7+ digits in a format string would pad to megabytes.
_HUGE_WIDTH = re.compile(r"\d{7,}")


class RenderTooLarge(SecurityError):
    """The output, or a value on the way to it, is over MAX_CHARS."""


_render = threading.local()  # the deadline of the render running on this thread


def _tick() -> None:
    deadline = getattr(_render, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise SecurityError(f"the template ran for over {MAX_SECONDS:g} s")


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _check_int_args(args: Iterable, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            raise SecurityError(f"an argument of {a:.3g} is over the limit of {MAX_CHARS:,}")


def _check_format(fmt: str) -> None:
    if _HUGE_WIDTH.search(fmt):
        raise SecurityError("a format string with a width or precision of a million or more")


def _too_big(what: str) -> RenderTooLarge:
    return RenderTooLarge(f"{what} would be over {MAX_CHARS:,} characters")


def bounded_range(*args: int) -> range:
    _check_int_args(args, {})
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise SecurityError(f"range of {len(r):,} items; the limit is {MAX_RANGE:,}")
    return r


def bounded_iter(it: Any) -> Iterator:
    """What a {% for %} loops over: the deadline is checked every 1024 steps."""
    for i, x in enumerate(it):
        if not i & 1023:
            _tick()
        yield x


def bounded_concat(*parts: Any) -> str:
    """The `~` operator, with its result's size checked before it is built."""
    strs = [p if isinstance(p, str) else str(p) for p in parts]
    if sum(map(len, strs)) > MAX_CHARS:
        raise _too_big("a `~` concatenation")
    return "".join(strs)


class _Bound(NodeTransformer):
    """Routes `~` and every {% for %}'s iterable through the checks above."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name("__kaki_concat", "load"), list(node.nodes), [], None, None,
                          lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name("__kaki_iter", "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node


def _bounded_filter(f):
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # the context and the filtered value pass

    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marker
    def call(*args, **kwargs):
        _tick()
        _check_int_args(args[skip:], kwargs)
        return f(*args, **kwargs)
    return call


def _bounded_join(f):
    @functools.wraps(f)
    def join(*args, **kwargs):
        value = args[1] if getattr(f, "jinja_pass_arg", None) else args[0]
        if isinstance(value, (list, tuple)) and sum(len(v) for v in value if isinstance(v, str)) > MAX_CHARS:
            raise _too_big("a join")
        return f(*args, **kwargs)
    return join


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.globals.update(range=bounded_range, __kaki_concat=bounded_concat, __kaki_iter=bounded_iter)
        self.filters = {name: _bounded_filter(_bounded_join(f) if name == "join" else f)
                        for name, f in self.filters.items()}

    def _parse(self, source, name, filename):
        return _Bound().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        ls, rs = _size(left), _size(right)
        if operator == "*":
            n, seq = (right, ls) if ls is not None else (left, rs)
            if seq is not None and isinstance(n, int) and seq * n > MAX_CHARS:
                raise _too_big("a `*` repetition")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise SecurityError(f"a product of over {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                    left.bit_length() * right > MAX_INT_BITS:
                raise SecurityError(f"a power of over {MAX_INT_BITS} bits")
        elif operator == "+":
            if ls is not None and rs is not None and ls + rs > MAX_CHARS:
                raise _too_big("a `+` concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _tick()
        _check_int_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        if value.__name__ == "format_map":
            def refuse(*args, **kwargs):
                raise SecurityError("str.format_map is not allowed in chat templates")
            return refuse
        _check_format(value.__self__)
        return wrapped


def render(template, limit_chars: int = MAX_CHARS, **variables) -> str:
    """Render a template made by BoundedSandbox, streamed, refusing output past `limit_chars`."""
    _render.deadline = time.monotonic() + MAX_SECONDS
    try:
        out, total = [], 0
        for chunk in template.generate(**variables):
            total += len(chunk)
            if total > limit_chars:
                raise _too_big("the rendered text")
            out.append(chunk)
            _tick()
        return "".join(out)
    finally:
        _render.deadline = None
