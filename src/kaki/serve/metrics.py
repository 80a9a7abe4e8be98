"""What `GET /metrics` reports, in Prometheus' text format (prometheus-client).

Each engine has its own registry, so several servers in one process (tests) do not mix counts.
Names follow vLLM's where there is one (time to first token, time per output token); the batch
size histogram has one bucket per size up to 8, so "steps that ran 8 or more sequences at once"
is `count - bucket{le="7"}`.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (re-exported for the route)

BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The scheduler's speculative-decoding counters (kaki.engine.speculative.SpecCounters): each is a
# Metrics attribute of the same name, a Prometheus counter kaki_<name>.
SPEC_COUNTERS = {
    "spec_draft_tokens": "tokens drafted for verification",
    "spec_accepted_tokens": "drafted tokens the model accepted",
    "decode_steps": "decode steps: one sequence in one target forward pass",
    "decode_tokens": "tokens those decode steps gave (more than the steps when drafts are accepted)",
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter("kaki_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.rejected = Counter("kaki_sequences_rejected", "sequences refused because the queue was full",
                                registry=r)
        self.prompt_tokens = Counter("kaki_prompt_tokens", "prompt tokens of admitted sequences", registry=r)
        self.prefix_hit_tokens = Counter("kaki_prefix_cache_hit_tokens", "prompt tokens whose keys and values "
                                         "came from the prefix cache (not prefilled)", registry=r)
        self.prefix_evictions = Counter("kaki_prefix_cache_evictions", "prefix-cache blocks evicted to make room",
                                        registry=r)
        self.prefix_bytes = Gauge("kaki_prefix_cache_bytes", "bytes of prefix-cache blocks held now (at most "
                                  "--prefix-cache-mb)", registry=r)
        self.generation_tokens = Counter("kaki_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("kaki_sequences_finished", "sequences finished, by reason "
                                "(stop, length, abort, error)", ["reason"], registry=r)
        self.queue_depth = Gauge("kaki_queue_depth", "sequences waiting for a batch row", registry=r)
        self.running = Gauge("kaki_running_sequences", "sequences in the running batch", registry=r)
        self.batch_size = Histogram("kaki_decode_batch_size", "sequences decoded together, one "
                                    "observation per decode step", buckets=BATCH_BUCKETS, registry=r)
        self.max_batch = Gauge("kaki_decode_batch_size_max", "the largest decode batch since start",
                               registry=r)
        self.ttft = Histogram("kaki_time_to_first_token_seconds", "from a sequence's arrival to its "
                              "first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("kaki_time_per_output_token_seconds", "between consecutive tokens of a "
                             "sequence", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kaki_sequence_latency_seconds", "from a sequence's arrival to its end",
                             buckets=E2E_BUCKETS, registry=r)
        self.moderation_checks = Counter("kaki_moderation_checks", "texts screened by --moderation, by where "
                                         "(input: a prompt or user message; output: a reply) and the deciding "
                                         "label", ["where", "label"], registry=r)
        self.moderation_blocked = Counter("kaki_moderation_blocked", "texts --moderation blocked, by where",
                                          ["where"], registry=r)
        # Speculative decoding (`kaki serve --speculate`/--draft-model): the counters give rates over
        # any window (accepted / drafted, tokens / steps); the two gauges are those ratios since start.
        for name, doc in SPEC_COUNTERS.items():
            setattr(self, name, Counter(f"kaki_{name}", doc, registry=r))
        self.spec_acceptance = Gauge("kaki_spec_acceptance_rate", "drafted tokens accepted / drafted, since start",
                                     registry=r)
        self.tokens_per_pass = Gauge("kaki_tokens_per_target_pass", "tokens per decode step (a sequence in a "
                                     "target forward pass), since start; 1 without speculation", registry=r)
        self._max = 0
        self._lock = threading.Lock()

    def note_speculation(self) -> None:
        """The two ratio gauges from the counters."""
        total = lambda name: self.registry.get_sample_value(f"kaki_{name}_total") or 0.0  # noqa: E731
        if total("spec_draft_tokens"):
            self.spec_acceptance.set(total("spec_accepted_tokens") / total("spec_draft_tokens"))
        if total("decode_steps"):
            self.tokens_per_pass.set(total("decode_tokens") / total("decode_steps"))

    def observe_max_batch(self, n: int) -> None:
        with self._lock:
            if n > self._max:
                self._max = n
                self.max_batch.set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
