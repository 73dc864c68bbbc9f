"""Sharded initialisation for FSDP2: weights are loaded after `fully_shard`, so only rank 0 ever holds
the full model (in CPU memory) and every other rank only its shard.

`LlavaLitModule(sharded_init=True)` builds the model on the meta device (configs only, no weights) on
every rank. In `configure_model` (training/strategies.py), after the skeleton is sharded,
`materialize_sharded`:
1. allocates each rank's shards (`to_empty`; the contents are garbage until step 2),
2. has rank 0 build the real model on CPU (from_pretrained, or the seeded random init) and broadcasts
   it tensor by tensor; each rank keeps its shard (`set_model_state_dict(full_state_dict=True,
   broadcast_from_rank0=True)`),
3. broadcasts the non-persistent buffers from rank 0 too: rotary `inv_freq`, CLIP `position_ids` are
   computed in `__init__` and are in no state dict, so `to_empty` would leave them uninitialised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def materialize_sharded(
    model: nn.Module, build_full: Callable[[], nn.Module] | None, device: torch.device
) -> None:
    """Fill a sharded meta-device `model` from the full model that `build_full()` makes on rank 0
    (pass None on every other rank)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    persistent = set(model.state_dict())
    full: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if build_full is not None:
        source = build_full()
        full = source.state_dict()
        buffers = {name: b for name, b in source.named_buffers() if name not in full}
        del source
    model.to_empty(device=device)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in persistent:
                continue
            if build_full is not None:
                buf.copy_(buffers[name])
            dist.broadcast(buf, src=0)
    log.info("sharded init: %d tensors loaded after sharding (broadcast from rank 0)", len(persistent))
