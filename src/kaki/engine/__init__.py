"""The one id-level engine: a scheduler over running sequences, one KV cache, one sampler path,
prefix caching across sequences, and one id-to-text adapter for the front ends.

- `kv.RowCache`: the KV cache the model's attention reads and writes (`kaki.model.AttentionCache`);
- `prefix.PrefixCache`: keys and values of token prefixes kept across sequences, within a budget;
- `sampler`: logits to tokens and logprobs, a failure confined to its row;
- `scheduler.Scheduler`: `add_request`, `step() -> [Event]`, `abort`, continuous batching;
- `text.TextSequence`: events to text (incremental detokenization, stop strings).
"""

from kaki.engine.kv import RowCache
from kaki.engine.prefix import PrefixCache
from kaki.engine.scheduler import Event, Scheduler, Sequence, check_prompt_fits
from kaki.engine.text import TextSequence

__all__ = ["Event", "PrefixCache", "RowCache", "Scheduler", "Sequence", "TextSequence", "check_prompt_fits"]
