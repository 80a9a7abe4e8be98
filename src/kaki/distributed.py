"""torch.distributed under torchrun, for training and inference alike: which process this is, on
which device, the process group, and how long a collective may wait.

`torchrun --nproc-per-node N -m kaki train|generate|chat|serve ...` sets RANK/WORLD_SIZE/LOCAL_RANK;
kaki then joins a process group (NCCL on CUDA, gloo on CPU). Several nodes work through torchrun's
own flags (--nnodes, --node-rank, --rdzv-endpoint); nothing in kaki changes. Training uses it for
DDP/FSDP (kaki.train), inference for tensor parallelism (kaki.tp, kaki.engine.mirror).

Every collective gives up after `collective_timeout()`, so a rank that died ends the others with
an error instead of a hang. Messages that are not tensors of the model (what rank 0 tells the other
ranks to run next) go over a gloo group of their own, `control_group()`, on the CPU whatever the
device, so they never queue behind the model's NCCL work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kaki.errors import KakiError

# How long a collective may wait for the other ranks before the process fails (instead of hanging
# when a rank died). Long enough for a slow first step on a big model; KAKI_COLLECTIVE_TIMEOUT
# (seconds) overrides it, and tests set it short.
DEFAULT_TIMEOUT_S = 600
# Between steps the ranks wait on rank 0 for as long as it is idle; it sends a heartbeat this often
# (and at least four times per timeout), so only a rank that is gone lets a wait time out.
MAX_HEARTBEAT_S = 5.0
TRAINING_TIMEOUT = timedelta(minutes=30)
# The ranks reach the process group (and the control group, after loading their shards) at their
# own pace: joining may take this long, whatever the collective timeout.
JOIN_TIMEOUT = timedelta(minutes=10)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def collective_timeout() -> timedelta:
    raw = os.environ.get("KAKI_COLLECTIVE_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise KakiError(f"KAKI_COLLECTIVE_TIMEOUT must be a number of seconds, not {raw!r}") from None
    if not seconds > 0:
        raise KakiError(f"KAKI_COLLECTIVE_TIMEOUT must be > 0 seconds, not {raw!r}")
    return timedelta(seconds=seconds)


def heartbeat_interval() -> float:
    return min(MAX_HEARTBEAT_S, collective_timeout().total_seconds() / 4)


def world_size() -> int:
    """Processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(tensor_parallel: int, command: str) -> None:
    """`--tensor-parallel N` runs one process per rank: N must be the number torchrun started."""
    world = world_size()
    if tensor_parallel < 1:
        raise KakiError(f"--tensor-parallel must be >= 1, got {tensor_parallel}")
    if tensor_parallel == world:
        return
    if world == 1:
        raise KakiError(f"--tensor-parallel {tensor_parallel} runs one process per rank: start it as `torchrun "
                        f"--nproc-per-node {tensor_parallel} -m kaki {command} ... --tensor-parallel {tensor_parallel}`")
    raise KakiError(f"--tensor-parallel {tensor_parallel} but torchrun started {world} processes; they must be "
                    f"equal (torchrun --nproc-per-node {tensor_parallel}, or --tensor-parallel {world})")


def init(device: torch.device, timeout: timedelta | None = None) -> None:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) once; timeout None: the collective
    timeout."""
    if dist.is_initialized():
        return
    timeout = timeout or collective_timeout()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=max(timeout, JOIN_TIMEOUT))
    _shorten(timeout, None)


def _shorten(timeout: timedelta, group) -> None:
    """The timeout of a group's collectives from now on, once every rank has joined it. torch
    has no public call for it: without one, the join timeout stays."""
    if timeout < JOIN_TIMEOUT and hasattr(dist.distributed_c10d, "_set_pg_timeout"):
        dist.distributed_c10d._set_pg_timeout(timeout, group)


_control: object | None = None


def control_group():
    """The gloo group for rank 0's messages to the other ranks. Creating it is itself a collective:
    every rank calls this at the same point (kaki.engine.mirror.start)."""
    global _control
    if _control is None:
        timeout = collective_timeout()
        _control = dist.new_group(backend="gloo", timeout=max(timeout, JOIN_TIMEOUT))
        _shorten(timeout, _control)
    return _control


def setup(device: str) -> Dist:
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KakiError(f"--device {device} asked for but this machine has no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise KakiError(f"--device must be cpu, cuda[:N] or auto, not {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    # Training's ranks wait at barriers while rank 0 writes a checkpoint (minutes for a big model
    # with its optimizer state): torch's own default (30 minutes) unless the timeout is set.
    if world > 1:
        init(dev, None if "KAKI_COLLECTIVE_TIMEOUT" in os.environ else TRAINING_TIMEOUT)
    return Dist(rank, world, local, dev)


def teardown(d: Dist | None = None) -> None:
    global _control
    if (d is None or d.distributed) and dist.is_initialized():
        dist.destroy_process_group()
        _control = None


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()
