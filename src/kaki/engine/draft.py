"""Speculative decoding with a draft model: a smaller model with the target's tokenizer proposes
the next K tokens of every drafting sequence, the target verifies them in one pass
(kaki.engine.speculative.verify).

The draft has its own KV cache whose rows mirror the target's (row r holds the same sequence in
both; `move` follows the scheduler's row moves). A row holds a prefix of its sequence's ids:
each step feeds the ids it does not hold yet (the last token at least; the whole prompt on a
sequence's first draft, since the draft has no prefix cache) and then each new draft but the
last, so after drafting d_1 .. d_k it holds ids + d_1 .. d_(k-1). When the target keeps `a` of
them, `rollback` drops the rejected ones: the row then holds ids + d_1 .. d_min(a, k-1), still a
prefix of the sequence, and the next step catches up from there.

Greedy sequences draft the draft's argmax; sampling ones draw from the draft's distribution q,
processed as the target's p is (repetition penalty, temperature, top-k, top-p), with the
sequence's own generator, and q goes to the acceptance rule (min(1, p/q), residual max(0, p - q)).
All drafting rows run together: one catch-up pass (left-padded; a catch-up longer than K + 1 ids,
such as a newcomer's prompt, runs its row alone first), then one pass per further draft.
"""

from __future__ import annotations

import torch

from kaki import sampling
from kaki.engine.kv import RowCache
from kaki.errors import KakiError
from kaki.model import CausalLM
from kaki.sampling import DEFAULT_DRAFT, MAX_DRAFT


def check_same_vocabulary(target_tok, draft_tok, target_vocab: int, draft_vocab: int, name: str = "the draft model") -> None:
    """A KakiError unless the draft's tokenizer gives every id the same piece as the target's (and
    the same eos/bos): draft ids are target ids, or verification compares different tokens."""
    why = None
    if target_tok.vocab_size != draft_tok.vocab_size:
        why = f"its tokenizer has {draft_tok.vocab_size:,} tokens, the target's {target_tok.vocab_size:,}"
    elif (target_tok.bos_id, sorted(target_tok.eos_ids)) != (draft_tok.bos_id, sorted(draft_tok.eos_ids)):
        why = (f"its bos/eos ids are {draft_tok.bos_id}/{sorted(draft_tok.eos_ids)}, the target's "
               f"{target_tok.bos_id}/{sorted(target_tok.eos_ids)}")
    else:
        n = target_tok.vocab_size
        # Every id is compared (a vocabulary of 262k takes well under a second).
        for i in range(n):
            a, b = target_tok.id_to_piece(i), draft_tok.id_to_piece(i)
            if a != b:
                why = f"token {i} is {b!r} in its tokenizer but {a!r} in the target's"
                break
    if why is None and draft_vocab < target_tok.vocab_size:
        why = f"its embedding has {draft_vocab:,} rows, fewer than the tokenizer's {target_tok.vocab_size:,} tokens"
    if why is not None:
        raise KakiError(f"{name} cannot draft for this model: {why}; a draft model must use the target's "
                        "tokenizer (a smaller model of the same family and release)")


class DraftModel:
    """A draft model and its KV cache, shared by a scheduler's sequences (one per scheduler)."""

    def __init__(self, model: CausalLM, vocab: int, k: int = DEFAULT_DRAFT):
        """vocab: the target's logits' width (its vocab_size): the draft's logits are cut or padded
        to it, so q and the target's p index the same ids (the rows past the tokenizer's are padding
        in both, checked by check_same_vocabulary)."""
        if not 1 <= k <= MAX_DRAFT:
            raise KakiError(f"--draft-k must be from 1 to {MAX_DRAFT}, got {k}")
        self.model = model
        self.vocab = vocab
        self.k = k
        self.cache: RowCache | None = None
        self.owner: list[int | None] = []  # the sequence id each row holds
        self.passes = 0  # draft forward passes run

    def fresh(self) -> "DraftModel":
        """The same model with a cache of its own (for another scheduler)."""
        return DraftModel(self.model, self.vocab, self.k)

    # ------------------------------------------------------------------------ rows

    def _reserve(self, rows: int, capacity: int) -> None:
        m = self.model
        if self.cache is None:
            self.cache = RowCache(m.config, rows, capacity, m.dtype, m.device)
        else:
            self.cache.reserve(rows, capacity)
        self.owner += [None] * (self.cache.rows - len(self.owner))

    def move(self, src: int, dst: int) -> None:
        """The target moved row `src`'s sequence to row `dst`: so does the draft's cache."""
        if self.cache is None or src >= self.cache.rows:
            return  # never drafted for: the owner check starts `dst` afresh
        self.cache.move(src, dst)  # dst < src: the scheduler fills holes with its last row
        self.owner[dst], self.owner[src] = self.owner[src], None

    def rollback(self, row: int, drafted: int, accepted: int) -> None:
        """The target kept `accepted` of the `drafted` tokens of this row's last draft: drop the
        rest from the draft's cache (it was fed all but the last draft)."""
        fed = drafted - 1
        self.cache.trim(row, fed - min(accepted, fed))

    # ------------------------------------------------------------------------ drafting

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int], rows: int, capacity: int) -> tuple[list[list[int]], list]:
        """Drafts for the running sequences (seqs[b] in row b), ks[b] tokens each (0: none), and the
        distributions q they were drawn from (None for greedy rows). `rows` and `capacity`: the
        target's cache, which the draft's mirrors."""
        self._reserve(rows, capacity)
        cache, dev = self.cache, self.model.device
        B = len(seqs)
        active = [b for b in range(B) if ks[b] > 0]
        feeds: list[list[int]] = [[] for _ in range(B)]
        for b in active:
            s = seqs[b]
            if self.owner[b] != s.id:  # a new sequence in this row (or one the draft lost track of)
                self.owner[b], cache.lengths[b] = s.id, 0
            n = len(s.prompt) + len(s.tokens)
            feeds[b] = s.ids(cache.lengths[b], n)  # everything the row does not hold, the last token included
            extra = len(feeds[b]) - (self.k + 1)
            if extra > 0:
                # A newcomer's prompt (or a long pause) runs alone first: the shared pass below is
                # padded to its longest feed, and every row would pay for this one's.
                cache.use(b, b + 1)
                self.model(torch.tensor([feeds[b][:extra]], device=dev), None, cache, last_only=True)
                self.passes += 1
                feeds[b] = feeds[b][extra:]
        drafts: list[list[int]] = [[] for _ in range(B)]
        qs: list[list[torch.Tensor] | None] = [None if seqs[b].params.greedy else [] for b in range(B)]
        # The passes run on rows [lo, hi), the span of the drafting ones (the rest are padding).
        lo, hi = active[0], active[-1] + 1
        S = max(len(f) for f in feeds)
        ids = torch.zeros(hi - lo, S, dtype=torch.long)
        valid = torch.zeros(hi - lo, S, dtype=torch.bool)
        for b in active:  # left-padded: each row's last id is in the last column
            ids[b - lo, S - len(feeds[b]):] = torch.tensor(feeds[b], dtype=torch.long)
            valid[b - lo, S - len(feeds[b]):] = True
        for j in range(max(ks)):
            cache.use(lo, hi)
            ids, valid = ids.to(dev), valid.to(dev)
            logits = self.model(ids, None, cache, None if bool(valid.all()) else valid, last_only=True)
            self.passes += 1
            logits = logits[:, -1, :self.vocab].float()
            if logits.shape[-1] < self.vocab:  # ids past the draft's embedding are never drafted
                logits = torch.nn.functional.pad(logits, (0, self.vocab - logits.shape[-1]), value=float("-inf"))
            for b in active:
                if j < ks[b]:
                    drafts[b].append(self._pick(seqs[b], logits[b - lo], drafts[b], qs[b]))
            # The next pass feeds each row's newest draft, for rows that draft another.
            more = [b for b in active if j + 1 < ks[b]]
            if not more:
                break
            ids = torch.zeros(hi - lo, 1, dtype=torch.long)
            valid = torch.zeros(hi - lo, 1, dtype=torch.bool)
            for b in more:
                ids[b - lo, 0], valid[b - lo, 0] = drafts[b][-1], True
        return drafts, [torch.stack(q) if q else None for q in qs]

    def _pick(self, s, logits: torch.Tensor, drafted: list[int], q: list | None) -> int:
        """The draft's next token for `s` after `drafted`, from its fp32 logits (V,); q collects the
        distribution it was drawn from (sampling rows)."""
        params = s.params
        if params.repetition_penalty != 1.0:
            seen = s.seen_ids()
            seen = torch.cat([seen, torch.tensor(drafted, dtype=torch.long, device=seen.device)])
            logits = sampling.apply_repetition_penalty(logits, seen.to(logits.device), params.repetition_penalty)
        if params.greedy:
            return int(torch.argmax(logits))
        p = sampling.target_probs(logits, params)
        q.append(p)
        return int(torch.multinomial(p, 1, generator=s.generator))
