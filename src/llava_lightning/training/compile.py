"""`--model.compile true`: `torch.compile` on each declared block (vision block, LLM decoder layer).

Each block's `forward` is compiled, not its `__call__`: the hooks a strategy puts on a block (FSDP2's
and DeepSpeed ZeRO-3's parameter gathering, which dynamo does not trace) stay outside the compiled
code, so a block is one graph under every strategy. Blocks of one class share one compiled function
(dynamo compiles it once per set of guards, e.g. once for checkpointed and once for plain blocks).
`strategies.configure_model` applies it after activation checkpointing and before sharding.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from ..model import LlavaModel

_COMPILED = "_llava_compiled"


def declared_blocks(model: LlavaModel) -> list[nn.Module]:
    """Every module of a declared block class (`LlavaModel.block_classes()`), vision tower first."""
    return [
        block
        for component, cls in model.block_classes().items()
        for block in getattr(model, component).modules()
        if isinstance(block, cls)
    ]


def compile_blocks(model: LlavaModel, **options: Any) -> int:
    """Compile the forward of every declared block of `model` in place (`compile_modules`)."""
    return compile_modules(declared_blocks(model), **options)


def compile_modules(blocks: list[nn.Module], **options: Any) -> int:
    """Compile each module's forward in place with `torch.compile(**options)`; modules compiled before
    are left as they are. Returns the number compiled now."""
    compiled: dict[Any, Any] = {}
    count = 0
    for block in blocks:
        if block.__dict__.get(_COMPILED):
            continue
        forward = block.forward
        if isinstance(forward, types.MethodType) and forward.__self__ is block:
            # The function behind it (the class's, or one set on the instance: a checkpointed timm
            # block), compiled once and bound to each block, so a deep copy calls its own blocks.
            function = forward.__func__
            if function not in compiled:
                compiled[function] = torch.compile(function, **options)
            block.forward = types.MethodType(compiled[function], block)
        else:
            block.forward = torch.compile(forward, **options)
        block.__dict__[_COMPILED] = True
        count += 1
    return count


def is_compiled(block: nn.Module) -> bool:
    """Whether `compile_blocks` compiled this block."""
    return bool(block.__dict__.get(_COMPILED))
