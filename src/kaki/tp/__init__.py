"""Tensor parallelism: one model split over several processes (Megatron's layout), each reading
only its slices of the checkpoint.

    # torchrun --nproc-per-node 2 script.py
    llm = kaki.load("models/kaki-tiny", tensor_parallel=2)

kaki.tp.group holds the rank and the collectives the model calls, kaki.tp.shard the rule for
which slice of each tensor a rank holds.
"""

from kaki.tp.group import TensorParallel, join, start
from kaki.tp.shard import local_config, shard_sources

__all__ = ["TensorParallel", "join", "start", "local_config", "shard_sources"]
