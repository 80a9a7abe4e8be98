"""Which slice of a tensor-parallel model this process holds, and the three collectives it needs.

Megatron's split (reference adept-inference.md §2.6): every rank holds whole attention heads (the
fused qkv rows are head-major, so a block of heads is a block of rows), a block of the MLP's
hidden units, and a block of vocabulary rows; norms are replicated. A layer's partial outputs
are summed with one all-reduce after the attention output projection and one after the MLP's
down projection; the logits of each vocabulary block are all-gathered, so every rank holds the
same full logits and samples the same token.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kaki.distributed import init
from kaki.errors import KakiError


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int
    group: object | None = None  # a torch.distributed ProcessGroup; None is the default group

    @property
    def first(self) -> bool:
        """Rank 0 adds the biases of row-parallel layers (each rank's partial sum must not)."""
        return self.rank == 0

    def part(self, n: int, what: str) -> int:
        """This rank's share of n heads / units; an error when they do not divide evenly."""
        if n % self.world:
            raise KakiError(f"{what} ({n}) does not divide by the tensor-parallel size ({self.world}); "
                            f"use a size that divides it ({_divisors(n)})")
        return n // self.world

    def span(self, n: int) -> tuple[int, int]:
        """Rows [lo, hi) of an evenly split dimension of size n."""
        k = n // self.world
        return self.rank * k, (self.rank + 1) * k

    def vocab_span(self, vocab: int) -> tuple[int, int]:
        """Vocabulary rows [lo, hi): blocks of ceil(vocab / world), the last one shorter when the
        vocabulary does not divide (Megatron pads its vocabulary so that it always does)."""
        chunk = -(-vocab // self.world)
        if chunk * (self.world - 1) >= vocab:
            raise KakiError(f"a vocabulary of {vocab} rows is too small to split over {self.world} ranks")
        return self.rank * chunk, min((self.rank + 1) * chunk, vocab)

    # ------------------------------------------------------------------------- collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's x, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, x: torch.Tensor, vocab: int) -> torch.Tensor:
        """Every rank's vocabulary block of x (..., block) joined into (..., vocab)."""
        chunk = -(-vocab // self.world)
        if x.shape[-1] < chunk:  # all_gather wants equal sizes: pad the short last block
            x = F.pad(x, (0, chunk - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    def embed(self, ids: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
        """Embedding lookup where this rank holds rows vocab_span(vocab) as `weight`: ids outside
        the block give zeros, and the all-reduce fills each position from the one rank that holds
        its row (adding exact zeros, so the result is bit-equal to one lookup)."""
        lo, _ = self.vocab_span(vocab)
        local = ids - lo
        inside = (local >= 0) & (local < weight.shape[0])
        x = F.embedding(local.masked_fill(~inside, 0), weight)  # (B, S, H)
        x = x.masked_fill(~inside[..., None], 0)
        return self.all_reduce(x)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)


def join(size: int, device: torch.device) -> TensorParallel:
    """The process group of `size` ranks this process belongs to: the one already initialised,
    else one started from torchrun's environment (NCCL on CUDA, gloo on CPU)."""
    if size < 1:
        raise KakiError(f"tensor_parallel must be >= 1, not {size}")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise KakiError(f"tensor_parallel={size} runs one process per rank: start it with "
                            f"`torchrun --nproc-per-node {size} ...` (or initialise torch.distributed first)")
        # Every collective gives up after the timeout (kaki.distributed): a rank that died ends the others.
        init(device)
    world = dist.get_world_size()
    if world != size:
        raise KakiError(f"tensor_parallel={size} but {world} processes were started; start "
                        f"`torchrun --nproc-per-node {size}` (one process per rank)")
    share_random_seed(device)
    return TensorParallel(dist.get_rank(), world)


def share_random_seed(device: torch.device) -> None:
    """Seed Python's `random` alike on every rank: an unseeded request draws its sampling seed
    from it (SamplingParams.make_generator), and ranks that drew different seeds would sample
    different tokens and feed the split model different inputs."""
    seed = torch.tensor([random.getrandbits(62)], dtype=torch.int64,
                        device=device if device.type == "cuda" else "cpu")
    dist.broadcast(seed, src=0)
    random.seed(int(seed.item()))


def rank_device(device: torch.device) -> torch.device:
    """On CUDA each rank takes the GPU of its local rank (torchrun's LOCAL_RANK)."""
    if device.type != "cuda" or device.index is not None:
        return device
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    return dev


def start(size: int, device: torch.device) -> tuple[TensorParallel | None, torch.device]:
    """(this process's rank, its device) for `tensor_parallel=size`; (None, device) for size 1."""
    if size == 1:
        return None, device
    device = rank_device(device)
    return join(size, device), device
