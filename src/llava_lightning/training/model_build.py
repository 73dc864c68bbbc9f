"""Building the run's `LlavaModel`: in full at construction, or as a meta-device skeleton whose weights
come later, once a strategy has sharded it (sharded init).

The weights are a released checkpoint's (`pretrained`: a llava-hf folder or hub name), or the spec's
parts' (hub weights, random init for `config` parts), plus `init_projector`. A later build starts
from the RNG state of construction, so a sharded run starts from the weights a direct build gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..model import LlavaModel, LlavaSpec


class ModelBuilder:
    """Builds `pretrained` or `spec` (+ `init_projector`) and hands each build to `prepare` (the stage's
    freezing). With `pretrained`, the spec contributes only `language.attn_implementation` and
    `language.trust_remote_code`."""

    def __init__(
        self,
        spec: LlavaSpec,
        init_projector: str | None,
        prepare: Callable[[LlavaModel], None],
        pretrained: str | None = None,
    ):
        self.spec, self.init_projector, self.prepare = spec, init_projector, prepare
        self.pretrained = pretrained
        self.rng_state = torch.random.get_rng_state()  # what a direct build would start from now

    def _model(self, load_weights: bool = True) -> LlavaModel:
        if self.pretrained is None:
            return LlavaModel.from_spec(self.spec, load_weights=load_weights)
        language = self.spec.language
        return LlavaModel.from_hf(
            self.pretrained,
            trust_remote_code=language.trust_remote_code,
            load_weights=load_weights,
            attn_implementation=language.attn_implementation,
        )

    def build(self, zero3: bool = False) -> LlavaModel:
        """The full model, prepared (`zero3`: under deepspeed.zero.Init, so the projector file loads
        into gathered partitions)."""
        model = self._model()
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
            model = self._model(load_weights=False)
        self.prepare(model)
        return model

    def empty(self) -> LlavaModel:
        """The model with storage but without hub weights (a checkpoint's state dict fills it next)."""
        model = self._model(load_weights=False)
        self.prepare(model)
        return model


def is_skeleton(model: torch.nn.Module) -> bool:
    """The model is still a meta-device skeleton (no storage yet)."""
    return any(p.is_meta for p in model.parameters())
