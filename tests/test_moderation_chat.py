"""`kaki chat --moderation` as a user runs it: the real process through a pipe. The chat model and the
moderation model are the tiny model trained in tests/moderation_model.py, which answers SECRET with a
reply holding TRIGGER and flags TRIGGER."""

from __future__ import annotations

import json
import re

from moderation_model import FLAGGED, HELLO, HELLO_REPLY, SECRET, mod_dir  # noqa: F401 (a fixture)
from test_chat import chat, run_kaki

from kaki.moderation import REFUSAL


def test_blocked_message_and_reply_get_the_refusal_and_leave_the_conversation(mod_dir, tmp_path):
    saved = tmp_path / "talk.json"
    r = chat(mod_dir, [HELLO, SECRET, FLAGGED, "/stats", HELLO, "/raw_prompt", f"/save {saved}", "/quit"],
             "--moderation", mod_dir, "-t", "0", "-n", "16")
    out = r.stdout.splitlines()
    assert out[:3] == [HELLO_REPLY, REFUSAL, REFUSAL]
    assert "[the reply was blocked by moderation (needs intervention, " in r.stderr
    assert "[your message was blocked by moderation (needs intervention, " in r.stderr
    stats = next(line for line in out if line.startswith("moderation: "))
    assert "(blocks needs caution, needs intervention)" in stats
    assert re.search(r"; last checked: message needs intervention 0\.\d\d blocked$", stats), stats
    # The model never sees the blocked exchanges again, and /save does not keep them.
    assert out[out.index(stats) + 1] == HELLO_REPLY
    prompt = "\n".join(out[out.index(stats) + 2:])
    assert prompt.strip() == f"human: {HELLO}\n\nadept: {HELLO_REPLY}\n\nhuman: {HELLO}\n\nadept:"
    assert json.loads(saved.read_text()) == [{"role": "user", "content": HELLO},
                                             {"role": "assistant", "content": HELLO_REPLY}] * 2


def test_without_moderation_the_same_reply_is_shown(mod_dir):
    r = chat(mod_dir, [SECRET, "/quit"], "-t", "0", "-n", "16")
    assert "poison" in r.stdout and "blocked" not in r.stderr


def test_unknown_block_label_is_a_clear_error(mod_dir):
    r = run_kaki("chat", "--model", mod_dir, "--moderation", mod_dir, "--moderation-block", "toxic",
                 "--device", "cpu", stdin="/quit\n")
    assert r.returncode == 2
    assert "'toxic' is not one of the moderation model's labels (casual, needs caution, needs intervention" in r.stderr
