"""Fully sharded data parallel training (`kaki train --fsdp`) under torchrun: wrapping the model and
gathering its (and the optimizer's) unsharded state for checkpoints. Joining the process group is
kaki.distributed's, shared with inference."""

from __future__ import annotations

import torch

from kaki.distributed import Dist

# torch.distributed.fsdp and .checkpoint are imported inside the functions: about a second of
# imports that only --fsdp runs use, and torch builds without distributed support lack them.


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
