"""torch.distributed under torchrun: which process this is, on which device, and the wrappers.

`torchrun --nproc-per-node N -m kaki train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; kaki then joins a
process group (NCCL on CUDA, gloo on CPU) and trains data parallel (DDP) or fully sharded
(`--fsdp`). Several nodes work through torchrun's own flags (--nnodes, --node-rank,
--rdzv-endpoint); nothing in kaki changes. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kaki.errors import KakiError


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


def setup(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
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
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    if d.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- FSDP

def wrap_fsdp(model, d: Dist):
    """FSDP2 (`fully_shard`): each decoder layer is one shard unit (its parameters are gathered
    for its forward and backward only), then the root takes the embeddings, final norm and head.
    Parameter names stay the same, so checkpoints use the unsharded names."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_model_state(model) -> dict:
    """Unsharded CPU state dict (every rank must call; rank 0 gets the tensors, others {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_tensors(model, optimizer) -> dict:
    """AdamW state as {"param name/key": tensor}, unsharded (every rank must call; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"{name}/{k}": v for name, st in osd.get("state", {}).items() for k, v in st.items()
            if isinstance(v, torch.Tensor)}


def load_full_optimizer_tensors(model, optimizer, tensors: dict) -> None:
    """Inverse of full_optimizer_tensors: every rank passes the full tensors, keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)  # for param_groups' layout
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, sub = key.rpartition("/")
        state.setdefault(name, {})[sub] = t
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": osd["param_groups"]},
                             options=opts)
