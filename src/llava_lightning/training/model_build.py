"""Building the run's `LlavaModel`: in full at construction, or as a meta-device skeleton whose weights
come later, once a strategy has sharded it (sharded init).

The weights are the hub's (random init for `config` parts) plus `init_projector`. A later build starts
from the RNG state of construction, so a sharded run starts from the weights a direct build gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..model import LlavaModel, LlavaSpec


class ModelBuilder:
    """Builds `spec` (+ `init_projector`) and hands each build to `prepare` (the stage's freezing)."""

    def __init__(self, spec: LlavaSpec, init_projector: str | None, prepare: Callable[[LlavaModel], None]):
        self.spec, self.init_projector, self.prepare = spec, init_projector, prepare
        self.rng_state = torch.random.get_rng_state()  # what a direct build would start from now

    def build(self, zero3: bool = False) -> LlavaModel:
        """The full model, prepared (`zero3`: under deepspeed.zero.Init, so the projector file loads
        into gathered partitions)."""
        model = LlavaModel.from_spec(self.spec)
        if self.init_projector:
            gather = contextlib.nullcontext()
            if zero3:
                import deepspeed

                projector = list(model.multi_modal_projector.parameters())
                gather = deepspeed.zero.GatheredParameters(projector, modifier_rank=0)
            with gather:
                model.init_projector_from(self.init_projector)
        self.prepare(model)
        return model

    def build_from_construction_rng(self, zero3: bool = False) -> LlavaModel:
        """`build` from the RNG state of construction; on CPU, except under zero.Init, which places and
        partitions the parameters itself."""
        with torch.random.fork_rng(devices=[]), contextlib.nullcontext() if zero3 else torch.device("cpu"):
            torch.random.set_rng_state(self.rng_state)
            return self.build(zero3)

    def skeleton(self) -> LlavaModel:
        """The model on the meta device: configs only, no storage, no weights read."""
        with torch.device("meta"):
            model = LlavaModel.from_spec(self.spec, load_weights=False)
        self.prepare(model)
        return model

    def empty(self) -> LlavaModel:
        """The model with storage but without hub weights (a checkpoint's state dict fills it next)."""
        model = LlavaModel.from_spec(self.spec, load_weights=False)
        self.prepare(model)
        return model


def is_skeleton(model: torch.nn.Module) -> bool:
    """The model is still a meta-device skeleton (no storage yet)."""
    return any(p.is_meta for p in model.parameters())
