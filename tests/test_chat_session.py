"""The chat session in-process: KV prefix reuse against transformers, the window, settings,
interrupted replies, /save and /load, and the seam `--retrieval` plugs into."""

from __future__ import annotations

import json

import pytest
import torch

import kaki
from kaki.chat import ChatSession, Settings
from kaki.chat.session import Turn
from kaki.chat_format import get_format, with_context
from kaki.engine import PrefixCache, RowCache, Scheduler
from kaki.errors import KakiError
from kaki.sampling import SamplingParams

from helpers import PAD, left_pad, random_prompts

FAMILIES = ["persimmon", "gpt_neox", "llama"]
TIE = 1e-4


@pytest.fixture(scope="module")
def llms(family_dirs):
    return {f: kaki.load(path, dtype="float32", device="cpu") for f, (_, path) in family_dirs.items()}


@pytest.fixture(scope="module")
def text_llm(text_model_dir):
    return kaki.load(text_model_dir[1], dtype="float32", device="cpu")


def hf_greedy(hf, prompt: list[int], n: int):
    ids, mask = left_pad([prompt])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=PAD)
    scores = torch.stack(out.scores, 1)[0]
    top2 = scores.topk(2, -1).values
    close = ((top2[:, 0] - top2[:, 1]) < TIE).nonzero()
    comparable = int(close[0, 0]) if len(close) else n  # past a near-tie fp32 may pick either token
    return out.sequences[0, ids.shape[1]:].tolist(), comparable


def run(sched: Scheduler, prompt: list[int], sp: SamplingParams) -> tuple[list[int], int, int]:
    """(tokens, prompt tokens reused from the prefix cache, prompt tokens the model ran)."""
    seq = sched.sequence(sched.add_request(prompt, sp))
    before = sched.prefilled_tokens
    while seq.finish_reason is None:
        sched.step()
    return seq.tokens, seq.reused_tokens, sched.prefilled_tokens - before


def conversation_engine(llm) -> Scheduler:
    """What a chat session drives: one row, a prefix cache in one-token blocks (kaki.chat.session)."""
    model = llm.model
    budget = llm.context_length * RowCache.bytes_per_token(model.config, model.dtype)
    return Scheduler(model, llm.eos_ids, max_rows=1,
                     prefix_cache=PrefixCache(model.config, model.dtype, model.device, budget, block_size=1))


# ----------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("family", FAMILIES)
def test_reusing_the_cache_gives_transformers_tokens(family_dirs, llms, family):
    """Turn 2 through the cache of turn 1 runs only its new tokens and generates what
    transformers generates from the whole prompt; the cache grew from empty as needed."""
    hf, llm = family_dirs[family][0], llms[family]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    p1, extra = random_prompts([20, 9], seed=11)
    sched = conversation_engine(llm)
    t1, reused, processed = run(sched, p1, greedy)
    assert processed == 20 and reused == 0
    assert sched.prefix.blocks == 20 + 16 - 1  # the last sampled token was never fed back
    assert sched.cache.capacity >= 36

    p2 = p1 + t1 + extra
    t2, reused, processed = run(sched, p2, greedy)
    assert reused == 35 and processed == len(p2) - 35
    ref, comparable = hf_greedy(hf, p2, 16)
    assert comparable >= 8
    assert t2[:comparable] == ref[:comparable]

    # A prompt that diverges early keeps only the shared part; an identical one still runs its
    # last token (its logits pick the first new token).
    t3, reused, _ = run(sched, p1[:5] + extra, greedy)
    assert t3 == run(Scheduler(llm.model, llm.eos_ids), p1[:5] + extra, greedy)[0]
    assert reused == 5
    _, _, processed = run(sched, p1[:5] + extra, greedy)
    assert processed == 1


def test_kv_cache_reserve_keeps_filled_slots(llms):
    model = llms["llama"].model
    cache = RowCache(model.config, 1, 8, model.dtype, model.device)
    cache.use(0, 1)
    model(torch.tensor([[5, 6, 7, 8, 9]]), cache=cache)
    k, v = cache.k[:, :, :, :5].clone(), cache.v[:, :, :, :5].clone()
    cache.reserve(1, 4)
    assert cache.capacity == 8
    cache.reserve(1, 40)
    assert cache.capacity == 40 and cache.lengths == [5]
    assert torch.equal(cache.k[:, :, :, :5], k) and torch.equal(cache.v[:, :, :, :5], v)


# ----------------------------------------------------------------------------- the session


def session(llm, fmt="adept", **kw) -> ChatSession:
    settings = Settings(temperature=0.0, sample=False, max_new_tokens=kw.pop("max_new_tokens", 8))
    return ChatSession(llm, get_format(fmt), settings=settings, **kw)


def test_turns_render_in_the_format_and_reuse_the_cache(text_llm):
    s = session(text_llm)
    r1 = s.say("Hello").run()
    assert s.last_prompt == "human: Hello\n\nadept:"
    assert r1.stats.reused_tokens == 0 and r1.stats.processed_tokens == r1.stats.prompt_tokens
    r2 = s.say("And then?").run()
    assert s.last_prompt == f"human: Hello\n\nadept: {r1.text.strip()}\n\nhuman: And then?\n\nadept:"
    assert r2.stats.reused_tokens >= r1.stats.prompt_tokens
    assert r2.stats.processed_tokens == r2.stats.prompt_tokens - r2.stats.reused_tokens
    assert r2.text.strip() == text_llm.generate(s.last_prompt, max_new_tokens=8)[0].text.strip()
    # /retry runs one token: the whole prompt is in the cache already.
    r3 = s.retry().run()
    assert (r3.stats.reused_tokens, r3.stats.processed_tokens) == (r3.stats.prompt_tokens - 1, 1)
    assert r3.text == r2.text and len(s.turns) == 4
    assert s.total_processed == sum(r.stats.processed_tokens for r in (r1, r2, r3))


def test_a_turn_runs_only_its_new_positions_and_stats_shows_the_prefix_cache(text_llm):
    """Counted where the tokens reach the model (a forward hook), not only by the engine: turn 2
    runs its new prompt tokens plus one position per decode step; /stats shows the session's
    prefix-cache counters, whose hit tokens are the turns' reused tokens."""
    import re
    s = session(text_llm, max_new_tokens=8)
    r1 = s.say("Hello").run()
    seen = []
    hook = text_llm.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].numel()))
    try:
        r2 = s.say("And then?").run()
    finally:
        hook.remove()
    assert r2.stats.reused_tokens >= r1.stats.prompt_tokens
    assert sum(seen) == (r2.stats.prompt_tokens - r2.stats.reused_tokens) + r2.stats.new_tokens - 1
    out, _ = run_shell(s, ["/stats", "/quit"])
    hits, evictions, kept = (int(x.replace(",", "")) for x in re.search(
        r"prefix cache: ([\d,]+) hit tokens, ([\d,]+) evictions, ([\d,]+) tokens kept", out).groups())
    assert hits == r1.stats.reused_tokens + r2.stats.reused_tokens and evictions == 0
    # Kept: both turns' fed tokens (prompt and all but the last reply token), the shared part once.
    fed1, fed2 = (r.stats.prompt_tokens + r.stats.new_tokens - 1 for r in (r1, r2))
    assert kept == fed2 + fed1 - r2.stats.reused_tokens


def test_a_tiny_prefix_cache_evicts_and_replies_stay_right(text_llm):
    """A prefix cache far smaller than the conversation: old blocks are evicted (counted in
    /stats), less is reused, and every greedy reply is still what `generate` gives for its prompt."""
    import re
    s = session(text_llm, max_new_tokens=8, cache_tokens=24)
    replies = [s.say(text).run() for text in ("Hello", "And then?", "Why?")]
    assert replies[-1].text.strip() == text_llm.generate(s.last_prompt, max_new_tokens=8)[0].text.strip()
    s.retry().run()
    assert s.turns[-1].content == replies[-1].text.strip()
    out, _ = run_shell(s, ["/stats", "/quit"])
    evictions, kept = (int(x.replace(",", "")) for x in re.search(
        r"prefix cache: [\d,]+ hit tokens, ([\d,]+) evictions, ([\d,]+) tokens kept", out).groups())
    assert evictions > 0 and kept <= 24
    assert all(r.stats.reused_tokens <= 24 for r in replies)
    off = session(text_llm, max_new_tokens=8, cache_tokens=0)
    off.say("Hello").run()
    assert off.say("And then?").run().stats.reused_tokens == 0 and off.prefix_cache is None


def test_openchatkit_format_and_system_text(family_dirs):
    """`auto` on a GPT-NeoX model is OpenChatKit's `<human>: ...\\n<bot>:`; --system leads."""
    from kaki.chat_format import format_for_llm
    llm = kaki.load(family_dirs["gpt_neox"][1], dtype="float32", device="cpu")
    s = ChatSession(llm, format_for_llm(llm, "auto"), system="Current Date: 2023-03-10",
                    settings=Settings(temperature=0.0, sample=False, max_new_tokens=4))
    r = s.say("Hello.").run()
    s.say("Where is Zurich?").run()
    assert s.last_prompt == f"Current Date: 2023-03-10\n\n<human>: Hello.\n<bot>: {r.text.strip()}\n<human>: Where is Zurich?\n<bot>:"


def test_interrupted_reply_keeps_what_was_shown(text_llm):
    s = session(text_llm, max_new_tokens=30)
    reply = s.say("Hello")
    pieces = iter(reply)
    shown = next(pieces) + next(pieces) + next(pieces)
    reply.stop()  # what the shell does on Ctrl-C
    assert reply.finish_reason == "interrupted"
    assert s.turns[-1].role == "assistant" and s.turns[-1].content == shown.strip()
    # The next turn starts from a clean cache and is still right.
    r2 = s.say("More").run()
    assert r2.stats.reused_tokens == 0
    assert r2.text.strip() == text_llm.generate(s.last_prompt, max_new_tokens=30)[0].text.strip()
    # Stopped before any text: as if the message had not been sent.
    quiet = s.say("Again")
    quiet.stop()
    assert quiet.finish_reason == "interrupted" and [t.content for t in s.turns][-1] == r2.text.strip()


def test_window_drops_oldest_turns_and_refuses_what_cannot_fit(text_llm):
    notes = []
    system = "Short answers. " + "The world is old. " * 8  # a long system text leaves little room
    s = session(text_llm, max_new_tokens=8, system=system, notify=notes.append)
    room = 256 - 8 - len(text_llm.tokenizer.encode(system))
    for i in range(10):
        s.say(f"Tell me about the world number {i}").run()
        assert len(text_llm.tokenizer.encode(s.last_prompt)) <= 256 - 8
        assert s.last_prompt.startswith(system + "\n\nhuman: ")  # the system text stays
        assert s.last_prompt.endswith(f"human: Tell me about the world number {i}\n\nadept:")
    assert s.window > 0 and len(s.turns) == 20
    assert "number 0" not in s.last_prompt
    assert len(notes) == 1 and "oldest messages are left out" in notes[0]
    before = list(s.turns)
    with pytest.raises(KakiError, match=r"this message is \d+ tokens .* but only 248 fit"):
        s.say("the man " * room)
    assert s.turns == before  # refused messages change nothing
    s.undo()
    assert len(s.turns) == 18 and s.window <= 18


def test_settings_change_live_and_refuse_bad_values():
    st = Settings(temperature=0.0, sample=False)
    assert st.set("temperature", "0.8") == "sample = on, temperature = 0.8"
    assert st.params([]).temperature == 0.8
    st.set("sample", "off")
    assert st.params([]).temperature == 0.0 and st.temperature == 0.8
    st.set("seed", "7")
    st.set("top-k", "5")
    assert (st.seed, st.top_k) == (7, 5)
    st.set("seed", "none")
    assert st.seed is None
    for key, value, message in [("top_p", "0", "top_p: must be in"), ("seed", "-1", "seed: must be"),
                                ("max_new_tokens", "1.5", "must be a whole number"),
                                ("sample", "maybe", "on or off"), ("warmth", "1", "unknown setting")]:
        snapshot = st.items()
        with pytest.raises(KakiError, match=message):
            st.set(key, value)
        assert st.items() == snapshot


def test_save_and_load(text_llm, tmp_path):
    s = session(text_llm, system="Be kind.")
    s.say("Hello").run()
    path = s.save(tmp_path / "c.json")
    saved = json.loads(path.read_text())
    assert saved[0] == {"role": "system", "content": "Be kind."} and len(saved) == 3
    fresh = session(text_llm)
    assert fresh.load(path) == 2 and fresh.system == "Be kind."
    assert fresh.messages() == saved
    # A chat-completions request body loads too.
    (tmp_path / "req.json").write_text(json.dumps({"model": "x", "messages": saved[1:]}))
    assert fresh.load(tmp_path / "req.json") == 2
    for text, message in [("[{\"role\": \"wizard\", \"content\": \"hi\"}]", "role 'wizard'"),
                          ("{\"messages\": 3}", "JSON list of messages"), ("not json", "not a JSON conversation")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(KakiError, match=message):
            fresh.load(tmp_path / "bad.json")
    assert fresh.messages() == saved


def test_retrieved_passages_go_into_the_answered_turn_only(text_llm):
    """The seam for --retrieval: passages in the context block of the question being answered;
    later prompts carry the bare question (context is turn-local)."""
    passages = {"What is len?": [{"title": "len()", "text": "Return the length of an object."}]}
    s = session(text_llm, retrieve=lambda q: passages.get(q, []))
    r = s.say("What is len?").run()
    block = with_context("What is len?", passages["What is len?"])
    assert s.last_prompt == f"human: {block}\n\nadept:"
    assert s.turns[0].passages == passages["What is len?"]
    s.say("Thanks").run()
    assert s.last_prompt == f"human: What is len?\n\nadept: {r.text.strip()}\n\nhuman: Thanks\n\nadept:"


# ----------------------------------------------------------------------------- untrusted /load and /save

def run_shell(s: ChatSession, lines: list[str]) -> tuple[str, str]:
    import io
    from kaki.chat.shell import ChatShell
    out, err = io.StringIO(), io.StringIO()
    assert ChatShell(s, stdin=io.StringIO("".join(x + "\n" for x in lines)), stdout=out, stderr=err).run() == 0
    return out.getvalue(), err.getvalue()


def test_load_refuses_deep_endless_and_oversized_files_and_the_session_goes_on(text_llm, tmp_path):
    import os
    import time
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "surrogate.json").write_text('[{"role": "user", "content": "hi \\ud800"}]')
    (tmp_path / "bad-utf8.json").write_bytes(b'[{"role": "user", "content": "\xff"}]')
    with open(tmp_path / "huge.json", "wb") as f:
        f.truncate((16 << 20) + 10)  # over docs/chat.md's 16 MB; sparse, so it costs no disk
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would wait for a writer forever
    s = session(text_llm)
    t = time.monotonic()
    out, err = run_shell(s, [f"/load {tmp_path / 'deep.json'}", "/load /dev/zero", f"/load {tmp_path / 'fifo'}",
                             f"/load {tmp_path / 'huge.json'}", f"/load {tmp_path / 'surrogate.json'}",
                             f"/load {tmp_path / 'bad-utf8.json'}", "Hello", "/quit"])
    assert time.monotonic() - t < 30
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 6, err
    for line, needle in zip(errors, ["nested too deeply", "/dev/zero is not a regular file", "fifo is not a regular",
                                     "is over 16 MB", "lone surrogate (U+D800 at character 3)",
                                     "bad-utf8.json is not UTF-8 text"]):
        assert needle in line, (needle, line)
    assert len(s.turns) == 2 and s.turns[0].content == "Hello" and out.strip()  # the session went on


def test_loaded_conversation_follows_the_context_rule(text_llm, tmp_path):
    """100k loaded messages: the window holds what fits, as it would have in a live chat; /save
    still writes all of them."""
    import re
    import time
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} about the world"}
            for i in range(100_000)]
    (tmp_path / "long.json").write_text(json.dumps(msgs))
    s = session(text_llm, max_new_tokens=8, system="Be brief.")
    t = time.monotonic()
    out, err = run_shell(s, [f"/load {tmp_path / 'long.json'}", "/stats", "/quit"])
    assert time.monotonic() - t < 60
    used, ctx = (int(x.replace(",", "")) for x in re.search(r"context: ([\d,]+) of ([\d,]+) tokens", out).groups())
    assert ctx == 256 and used <= ctx - 8, out
    assert f"loaded 100000 messages from {tmp_path / 'long.json'}; the oldest {s.window} are outside the model's " \
        "256-token context" in err
    # The rule a live chat applies: the window starts at a user turn, everything from there fits,
    # and starting at the previous user turn would not.
    w = s.window
    assert s.turns[w].role == "user" and w > 0
    encode = lambda turns: len(s._encode(s._render(turns, add_generation_prompt=False)))  # noqa: E731
    assert encode(s.turns[w:]) <= 256 - 8 < encode(s.turns[w - 2:])
    s.say("and the last one?").run()  # a turn runs
    assert len(s.messages()) == 100_003 and s.messages()[1] == msgs[0]


@pytest.mark.parametrize("existing,umask,want", [(0o600, 0o022, 0o600), (0o640, 0o077, 0o640),
                                                 (None, 0o027, 0o640), (None, 0o077, 0o600)])
def test_save_keeps_the_files_mode_or_honours_the_umask(text_llm, tmp_path, existing, umask, want):
    import os
    import stat
    path = tmp_path / "c.json"
    if existing is not None:
        path.write_text("[]")
        path.chmod(existing)
    s = session(text_llm)
    s.turns.append(Turn("user", "hi"))
    old = os.umask(umask)
    try:
        s.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == want
    assert json.loads(path.read_text()) == [{"role": "user", "content": "hi"}]
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind
