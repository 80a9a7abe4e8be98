"""Tensor-parallel stepping: rank 0 runs the schedulers, every other rank runs the same steps.

Every rank holds a shard of the model (kaki.tp) and must run the same forward passes, in the same
order, on the same inputs. Rank 0 sends no tensors: it sends what its schedulers were asked to do
since its last message (a scheduler or prefix cache made or dropped, a request queued with its
token ids, parameters and seed, an abort, the KV cache allocated) and which scheduler steps next.
A follower's scheduler, given the same calls and the same all-gathered logits, decides the same
things: the same rows, prefix-cache hits, stores and evictions, drafts and rollbacks, and sampled
tokens (a request without a seed gets one from rank 0, so its generator draws alike everywhere).

Messages are pickled objects on kaki.distributed's gloo control group (the ranks are one job's
processes). Between steps a follower waits for the next message for as long as rank 0 is idle:
rank 0 sends a heartbeat every `heartbeat_interval()`, so a wait that reaches the collective
timeout means rank 0 is gone. Within a step the collectives time out the same way, and a step
whose forward pass failed on any rank (a peer lost or hung, memory) ends the job, since the ranks
could no longer be sure to run the same steps; so does a follower that decided a step otherwise
than rank 0 (each message carries a digest of rank 0's last step). The job ends with `RankLost`:
a follower exits with an error, rank 0 raises it from the step (and, when it was not the main
thread that found out, e.g. the server's engine thread or the heartbeat, sends itself SIGTERM so
that the server shuts down). `stop()` (at exit, or SIGTERM) lets the followers go.

    llm = kaki.load(path, tensor_parallel=2)       # under torchrun --nproc-per-node 2
    if mirror.start(llm):                         # rank 0; the others follow inside start()
        print(llm.generate("Hello")[0].text)
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import os
import random
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch.distributed as dist
from loguru import logger

from kaki.distributed import control_group, heartbeat_interval, teardown
from kaki.engine.prefix import PrefixCache
from kaki.engine.scheduler import Scheduler
from kaki.errors import KakiError, RankLost


@dataclass
class Message:
    """Rank 0's word to the other ranks: calls to replay, then (maybe) one scheduler's step."""

    ops: list[tuple] = field(default_factory=list)
    step: int | None = None  # the id of the scheduler to step
    stop: bool = False  # rank 0 is done: the followers return
    check: tuple[int, int] | None = None  # (scheduler id, its digest after rank 0's last step of it)


class Leader:
    """Rank 0's side: the schedulers' hooks record calls (`Scheduler.leader`), `stepping` sends
    them with each step, a thread sends heartbeats while nothing steps."""

    def __init__(self, group):
        self.group = group
        self.failure: str | None = None
        self.stopped = False
        # One message at a time, and none while a step runs: the followers are then in the step's
        # collectives, not waiting for a message.
        self._lock = threading.Lock()
        self._ops: list[tuple] = []
        self._ops_lock = threading.Lock()  # calls are recorded from the stepping thread and GC
        self._ids = itertools.count()
        self._prefix_ids: weakref.WeakKeyDictionary[PrefixCache, int] = weakref.WeakKeyDictionary()
        self._last_sent = time.monotonic()
        self._check: tuple[int, int] | None = None
        self._quit = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="kaki-tp-heartbeat", daemon=True)
        self._beat.start()

    # ------------------------------------------------------------------ the scheduler's hooks

    def created(self, sched: Scheduler, prefix_cache: PrefixCache | None, **settings) -> None:
        sched.mirror_id = sid = next(self._ids)
        pid = None
        if prefix_cache is not None:
            pid = self._prefix_ids.get(prefix_cache)
            if pid is None:
                pid = self._prefix_ids[prefix_cache] = next(self._ids)
                self._record(("prefix", pid, prefix_cache.budget_bytes, prefix_cache.block_size))
                weakref.finalize(prefix_cache, self._record, ("drop", pid))
        self._record(("new", sid, pid, settings))
        weakref.finalize(sched, self._record, ("drop", sid))

    def added(self, sched: Scheduler, prompt: list[int], params, max_new: int):
        if params.seed is None:  # the followers' generators must draw what rank 0's draws
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        self._record(("add", sched.mirror_id, prompt, params, max_new))
        return params

    def aborted(self, sched: Scheduler, seq_id: int, reason: str) -> None:
        self._record(("abort", sched.mirror_id, seq_id, reason))

    def allocated(self, sched: Scheduler) -> None:
        self._record(("allocate", sched.mirror_id))

    @contextmanager
    def stepping(self, sched: Scheduler):
        """Send the calls so far and `sched`'s step, then hold every other message back until the
        step (and its collectives) has run here too."""
        with self._lock:
            if self.stopped:
                raise RankLost(self.failure or "the tensor-parallel ranks were stopped (kaki.engine.mirror.stop); "
                               "no step can run")
            self._send(Message(self._take_ops(), sched.mirror_id, check=self._check))
            self._check = None
            error = sched.error
            yield
            if sched.error is not error:
                # A failed pass (a collective that timed out or lost its peer, or memory on one
                # rank) leaves the ranks unsure to be in step: the job ends rather than diverge.
                self._fail(f"a forward pass of a tensor-parallel step failed on rank 0 ({sched.error})")
            self._check = (sched.mirror_id, digest(sched))

    # ------------------------------------------------------------------ messages

    def stop(self) -> None:
        """Tell the followers to return (once); they may be mid-step for at most a step."""
        self._quit.set()
        if not self._lock.acquire(timeout=heartbeat_interval() * 4):
            return  # a step is stuck: the followers end on the collective timeout instead
        try:
            if not self.stopped:
                self.stopped = True
                self._send(Message(self._take_ops(), stop=True, check=self._check), quiet=True)
        finally:
            self._lock.release()
        self._beat.join(heartbeat_interval())

    def _record(self, op: tuple) -> None:
        with self._ops_lock:
            self._ops.append(op)

    def _take_ops(self) -> list[tuple]:
        with self._ops_lock:
            ops, self._ops = self._ops, []
        return ops

    def _send(self, msg: Message, quiet: bool = False) -> None:
        try:
            dist.broadcast_object_list([msg], src=0, group=self.group)
        except Exception as e:  # noqa: BLE001 (gloo raises RuntimeError or DistBackendError alike)
            why = f"tensor-parallel rank 0 lost another rank ({type(e).__name__}: {_first_line(e)})"
            if quiet:
                self.stopped, self.failure = True, why
                return
            self._fail(why)
        self._last_sent = time.monotonic()

    def _fail(self, why: str) -> None:
        self.stopped = True
        self.failure = f"{why}; every rank of the job must run to the end, so this one stops too"
        if threading.current_thread() is not threading.main_thread():
            # The main thread (the server, or a shell waiting for input) learns of it this way.
            logger.error("kaki: {}", self.failure)
            os.kill(os.getpid(), signal.SIGTERM)
        raise RankLost(self.failure) from None

    def _heartbeat(self) -> None:
        every = heartbeat_interval()
        while not self._quit.wait(every / 2):
            if time.monotonic() - self._last_sent < every or not self._lock.acquire(blocking=False):
                continue  # a message went out lately, or a step is running
            try:
                if not self.stopped:
                    self._send(Message(self._take_ops(), check=self._check))
                    self._check = None
            except RankLost:
                return
            finally:
                self._lock.release()


def digest(sched: Scheduler) -> int:
    """A fingerprint of what a step decided (which sequences run, in which rows, with how many
    tokens, ending in which token), for followers to check that they decided the same."""
    return hash(tuple((s.id, len(s.tokens), s.tokens[-1] if s.tokens else -1) for s in sched.running)
                + tuple(s.id for s in sched.waiting))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else "no message"


# ---------------------------------------------------------------------- followers


def follow(llm, group) -> None:
    """Replay rank 0's calls and steps on this rank's shard of `llm` (and its draft model, which
    every rank loads whole) until rank 0 stops; RankLost when rank 0 is gone."""
    schedulers: dict[int, Scheduler] = {}
    prefixes: dict[int, PrefixCache] = {}
    after: dict[int, int] = {}  # each scheduler's digest after its last step here
    rank = dist.get_rank()
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except Exception as e:  # noqa: BLE001
            raise RankLost(f"tensor-parallel rank {rank} lost rank 0 ({type(e).__name__}: {_first_line(e)}); "
                           "every rank of the job must run to the end, so this one stops too") from None
        msg: Message = box[0]
        if msg.check is not None and after.pop(msg.check[0], msg.check[1]) != msg.check[1]:
            raise RankLost(f"tensor-parallel rank {rank} decided a step differently from rank 0 (other tokens "
                           "sampled or other sequences ended); the ranks must see identical logits, so the job stops")
        for op in msg.ops:
            _replay(op, llm, schedulers, prefixes)
            if op[0] == "drop":
                after.pop(op[1], None)
        if msg.step is not None:
            sched = schedulers[msg.step]
            error = sched.error
            sched.step()
            if sched.error is not error:
                raise RankLost(f"a forward pass of a tensor-parallel step failed on rank {rank} ({sched.error}); "
                               "every rank of the job must run to the end, so this one stops too")
            after[msg.step] = digest(sched)
        if msg.stop:
            return


def _replay(op: tuple, llm, schedulers: dict, prefixes: dict) -> None:
    kind, key, model = op[0], op[1], llm.model
    if kind == "prefix":
        prefixes[key] = PrefixCache(model.config, model.dtype, model.device, op[2], block_size=op[3])
    elif kind == "new":
        pid, settings = op[2], dict(op[3])
        eos = settings.pop("eos_ids")
        draft = getattr(llm, "draft", None) if settings.pop("draft") else None
        if draft is None and op[3]["draft"]:
            raise KakiError(f"tensor-parallel rank 0 speculates with a draft model but rank {dist.get_rank()} "
                            "has none; start every rank with the same --draft-model")
        schedulers[key] = Scheduler(model, eos, prefix_cache=prefixes.get(pid) if pid is not None else None,
                                    draft=draft, **settings)
    elif kind == "drop":
        schedulers.pop(key, None)
        prefixes.pop(key, None)
    elif kind == "add":
        schedulers[key].add_request(op[2], op[3], op[4])
    elif kind == "abort":
        schedulers[key].abort(op[2], op[3])
    elif kind == "allocate":
        schedulers[key].allocate()
    else:
        raise KakiError(f"tensor-parallel rank {dist.get_rank()} got an unknown call {kind!r} from rank 0 "
                        "(the ranks run different kaki versions?)")


# ---------------------------------------------------------------------- entry points


def start(llm) -> bool:
    """Under torchrun with a tensor-parallel `llm` (kaki.load(..., tensor_parallel=N)): on rank 0,
    make its schedulers lead and return True; on the other ranks, follow rank 0's steps until it
    stops, then return False (RankLost if it is lost). Without several ranks: True, nothing to do."""
    model = llm.model
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    group = control_group()  # a collective: every rank makes it here
    if dist.get_rank() != 0:
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C in a terminal reaches every rank: rank 0 decides (stop a reply, or end and tell us).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            follow(llm, group)
        finally:
            teardown()  # gloo's threads must not outlive the interpreter (an abort at exit)
        return False
    if getattr(model, "leader", None) is not None:
        raise KakiError("kaki.engine.mirror.start was already called for this model")
    model.leader = Leader(group)
    atexit.register(_finish, llm)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # Unwind (finally blocks, atexit) so that the followers are told to stop, not left to time out.
        signal.signal(signal.SIGTERM, functools.partial(_exit_on_sigterm, model.leader))
    return True


def stop(llm) -> str | None:
    """On rank 0: let the followers return. Returns the failure that stopped the ranks, if any."""
    leader = getattr(llm.model, "leader", None)
    if leader is None:
        return None
    leader.stop()
    return leader.failure


def _finish(llm) -> None:
    stop(llm)
    teardown()


def _exit_on_sigterm(leader: Leader, signum, frame) -> None:
    sys.exit(1 if leader.failure else 128 + signum)  # 1: a lost rank (the leader sent it), else as killed
