"""Chat formats against their sources: the Persimmon seed README, OpenChatKit's bot.py (as the
reference describes it), and transformers' own rendering of a tokenizer's chat_template."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kaki.chat_format import (ADEPT, OPENCHATKIT, PLAIN, TemplateFormat, fit_passages, format_for_dir,
                              format_for_llm, get_format, parse_context, render_context, split_context,
                              with_context)
from kaki.errors import KakiError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


# ----------------------------------------------------------------------------- adept (Persimmon)

def test_adept_single_turn_is_the_seed_curl_prompt():
    # The seed README's server example: "prompts": ["human: Hello, how are you?\n\nadept:"]
    assert ADEPT.render([U("Hello, how are you?")]) == "human: Hello, how are you?\n\nadept:"


def test_adept_follow_up_is_the_seed_footnote():
    # [^1]: `human: {prompt}\n\nadept: {output}\n\nhuman: {follow_up}\n\nadept:`
    msgs = [U("{prompt}"), A("{output}"), U("{follow_up}")]
    assert ADEPT.render(msgs) == "human: {prompt}\n\nadept: {output}\n\nhuman: {follow_up}\n\nadept:"


def test_adept_stop_string_ends_a_reply_at_the_next_turn():
    rendered = ADEPT.render([U("a"), A("b"), U("c")])
    reply_and_more = rendered[len("human: a\n\nadept:"):]
    cut = min(reply_and_more.find(s) for s in ADEPT.stop)
    assert reply_and_more[:cut] == " b"


def test_adept_system_text_is_a_leading_paragraph():
    msgs = [{"role": "system", "content": "Be brief."}, U("Hi")]
    assert ADEPT.render(msgs) == "Be brief.\n\nhuman: Hi\n\nadept:"


def test_adept_spans_cover_each_reply_with_its_leading_space():
    msgs = [U("Q1"), A("R1"), U("Q2"), A("R2")]
    text, spans = ADEPT.render_with_spans(msgs)
    assert text == "human: Q1\n\nadept: R1\n\nhuman: Q2\n\nadept: R2"
    assert [text[a:b] for a, b in spans] == [" R1", " R2"]
    # The training text is the inference prompt followed by the reply.
    assert text.startswith(ADEPT.render(msgs[:3]))


# ----------------------------------------------------------------------------- OpenChatKit

def test_openchatkit_matches_bot_py_example_prompt():
    # reference/openchatkit.md §1.4: the prompt after one exchange, with the pre-prompt.
    expected = ("Current Date: 2023-03-10\nCurrent Time: 14:03:11 PM UTC\n\n"
                "<human>: Hello.\n<bot>: Hello human.\n<human>: Where is Zurich?\n<bot>:")
    msgs = [{"role": "system", "content": "Current Date: 2023-03-10\nCurrent Time: 14:03:11 PM UTC"},
            U("Hello."), A("Hello human."), U("Where is Zurich?")]
    assert OPENCHATKIT.render(msgs) == expected


def test_openchatkit_spans_and_stop():
    text, spans = OPENCHATKIT.render_with_spans([U("Hi"), A("Hello human.")])
    assert text == "<human>: Hi\n<bot>: Hello human.\n"
    assert [text[a:b] for a, b in spans] == [" Hello human.\n"]
    generated = " Zurich is in Switzerland.\n<human>: and"
    assert generated[:generated.find(OPENCHATKIT.stop[0])] == " Zurich is in Switzerland."


def test_plain_has_no_markers():
    assert PLAIN.render([U("one"), A("two"), U("three")]) == "one\n\ntwo\n\nthree\n\n"
    text, spans = PLAIN.render_with_spans([U("one"), A("two")])
    assert (text, [text[a:b] for a, b in spans]) == ("one\n\ntwo", ["two"])
    assert PLAIN.stop == []


def test_bad_messages_are_refused_clearly():
    with pytest.raises(KakiError, match="role 'robot'"):
        ADEPT.render([{"role": "robot", "content": "x"}])
    with pytest.raises(KakiError, match="only the first"):
        ADEPT.render([U("x"), {"role": "system", "content": "y"}])
    with pytest.raises(KakiError, match="unknown chat format"):
        get_format("vicuna")


# ----------------------------------------------------------------------------- chat_template

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role') }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}<|assistant|>\n{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory) -> Path:
    """A tokenizer directory with a chat_template that transformers itself loads (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tmpl")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (d / "config.json").write_text(json.dumps({"model_type": "persimmon"}))
    return d


CONVERSATIONS = [
    [U("Hello")],
    [{"role": "system", "content": "You are terse."}, U("Hello"), A("Hi."), U("Where is Zurich?")],
    [U("a"), A("b")],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_template_renders_like_transformers(template_dir, conv, gen):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(template_dir)
    expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    fmt = format_for_dir(template_dir)
    assert fmt.name == "template"
    assert fmt.render(conv, add_generation_prompt=gen) == expected


def test_template_spans_and_bos(template_dir):
    fmt = format_for_dir(template_dir)
    text, spans = fmt.render_with_spans([U("Hello"), A("Hi."), U("More"), A("Sure.")])
    assert [text[a:b] for a, b in spans] == ["Hi.</s>", "Sure.</s>"]
    assert fmt.add_bos is False  # the template writes <s> itself


def test_template_errors_are_kaki_errors():
    with pytest.raises(KakiError, match="not valid jinja2"):
        TemplateFormat("{% for %}")
    fmt = TemplateFormat("{{ raise_exception('no system role') }}")
    with pytest.raises(KakiError, match="no system role"):
        fmt.render([U("x")])


def test_template_is_sandboxed():
    fmt = TemplateFormat("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(KakiError, match="unsafe"):
        fmt.render([U("x")])


# ----------------------------------------------------------------------------- auto

def _model_dir(root: Path, name: str, model_type: str, template: str | None = None) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    if template is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return d


@pytest.mark.parametrize("model_type,template,expected", [
    ("persimmon", None, "adept"),
    ("gpt_neox", None, "openchatkit"),
    ("llama", None, "plain"),
    ("persimmon", CHAT_TEMPLATE, "template"),
    ("gpt_neox", CHAT_TEMPLATE, "template"),
    ("llama", [{"name": "default", "template": CHAT_TEMPLATE}, {"name": "tool_use", "template": "x"}],
     "template"),
])
def test_auto_picks_by_directory(tmp_path, model_type, template, expected):
    d = _model_dir(tmp_path, "m", model_type, template)
    assert format_for_dir(d).name == expected
    assert format_for_dir(d, "plain").name == "plain"  # an explicit choice wins


def test_template_without_one_is_an_error(tmp_path):
    d = _model_dir(tmp_path, "m", "persimmon")
    with pytest.raises(KakiError, match="no"):
        format_for_dir(d, "template")


def test_format_for_loaded_model(family_dirs):
    import kaki

    for family, expected in (("persimmon", "adept"), ("gpt_neox", "openchatkit"), ("llama", "plain")):
        llm = kaki.load(family_dirs[family][1], dtype="float32", device="cpu")
        assert format_for_llm(llm).name == expected


# ----------------------------------------------------------------------------- context block

PASSAGES = [
    {"title": "json.dumps (library/json)",
     "text": "json.dumps(obj, *, skipkeys=False)\nSerialize obj to a JSON formatted str."},
    {"title": "Sorting HOW TO: Key Functions (howto/sorting)",
     "text": "Both list.sort() and sorted() have a key parameter.\n    >>> sorted(\"This is\".split(), key=str.lower)"},
    {"title": "[weird] title: with brackets", "text": "[2] looks like a header but is text\nQuestion: not one"},
]


def test_context_block_round_trips():
    block = render_context(PASSAGES)
    assert block.startswith("Context:\n[1] json.dumps (library/json)\njson.dumps(")
    assert parse_context(block) == PASSAGES


def test_context_block_inside_a_rendered_conversation():
    first = with_context("How do I serialize?", PASSAGES[:1])
    second = with_context("How do I sort by key?", PASSAGES[1:])
    prompt = ADEPT.render([U(first), A("Use json.dumps."), U(second)])
    # The parser `/sources` uses finds the passages of the latest turn in the whole prompt.
    assert parse_context(prompt) == PASSAGES[1:]
    assert split_context(second) == (PASSAGES[1:], "How do I sort by key?")
    assert split_context(first) == (PASSAGES[:1], "How do I serialize?")


def test_context_block_normalizes_blank_lines_and_titles():
    raw = [{"title": "a\ntitle", "text": "para one\n\n\npara two\n", "source": "x"}]
    assert parse_context(render_context(raw)) == [{"title": "a title", "text": "para one\npara two"}]


def test_no_passages_no_block():
    assert render_context([]) == ""
    assert with_context("Why?", []) == "Why?"
    assert parse_context("human: Why?\n\nadept:") == []
    assert split_context("Why?") == ([], "Why?")


def test_fit_passages_keeps_what_fits_in_rank_order(family_dirs):
    import kaki

    tok = kaki.load(family_dirs["persimmon"][1], dtype="float32", device="cpu").tokenizer
    count = lambda s: len(tok.encode(s, add_bos=False))  # noqa: E731
    long = {"title": "long", "text": "word " * 400}
    ps = [PASSAGES[0], long, PASSAGES[1]]
    budget = count(render_context([PASSAGES[0], PASSAGES[1]]) + "\n\nQuestion: ") + 1
    kept = fit_passages(ps, budget, count)
    assert kept == [PASSAGES[0], PASSAGES[1]]  # the long one is skipped, the later short one fits
    assert fit_passages(ps, 5, count) == []
    assert fit_passages(ps, 10 ** 6, count) == ps


# ----------------------------------------------------------------------------- untrusted templates

@pytest.mark.parametrize("template,needle", [
    ("{{ range(10**9)|list }}", "over the limit"),
    ("{% for i in range(200000) %}{% endfor %}", "range of 200,000 items"),
    ("{{ 'a' * 10**10 }}", "`*` repetition would be over"),
    ("{{ ['a'] * 10**10 }}", "`*` repetition would be over"),
    ("{{ 'a'.ljust(10**10) }}", "over the limit"),
    ("{{ 'a'|center(10**10) }}", "over the limit"),
    ("{{ '{:>9999999999}'.format(1) }}", "width or precision"),
    ("{{ '%9999999999d' % 1 }}", "width or precision"),
    ("{{ '{0}'.format_map({}) }}", "format_map is not allowed"),
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{{ 7 ** 100000 }}", "a power of over"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "`~` concatenation would be over"),
    ("{% for i in range(90000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered text would be over"),
    ("{% set s = 'a' * 8000000 %}{{ ([s] * 1000)|join }}", "a join would be over"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ messages[9].content.x }}", "no element 9"),
])
def test_template_failures_are_one_kaki_error_without_large_allocation(template, needle):
    """Each would raise OverflowError/MemoryError/TypeError/... out of render, or allocate
    gigabytes, without the bounded sandbox: sizes are checked before anything is built."""
    import time
    fmt = TemplateFormat(template)
    t = time.monotonic()
    with pytest.raises(KakiError, match="chat_template failed") as e:
        fmt.render([U("x")])
    assert time.monotonic() - t < 5
    assert re.search(needle, str(e.value)), str(e.value)


def test_runaway_template_loop_is_stopped():
    from kaki.jinja_sandbox import MAX_SECONDS
    fmt = TemplateFormat("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}")
    import time
    t = time.monotonic()
    with pytest.raises(KakiError, match="ran for over"):
        fmt.render([U("x")])
    assert time.monotonic() - t < MAX_SECONDS + 3


def test_format_for_dir_names_the_template_file(tmp_path):
    d = _model_dir(tmp_path, "m", "llama", "{{ 1 + 'a' }}")
    with pytest.raises(KakiError, match=f"chat_template of {re.escape(str(d / 'tokenizer_config.json'))} failed"):
        format_for_dir(d).render([U("x")])
