"""Projectors that map vision features into the LLM's embedding space: linear, mlp{N}x_gelu, identity.

Key names follow transformers' `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`, ...), so
an mlp2x_gelu projector exports to llava-hf by a key copy.
"""

from __future__ import annotations

import re

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class MLPProjector(nn.Module):
    """`depth` Linear layers with GELU between them: linear_1 -> act -> linear_2 -> ... -> linear_{depth}."""

    def __init__(self, in_features: int, out_features: int, depth: int, bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.depth = depth
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        if depth > 1:
            # One shared activation module, as transformers' projector has (`act`); GELU has no state.
            self.act = nn.GELU()
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(out_features, out_features, bias=bias))

    def forward(self, x):
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x


class IdentityProjector(nn.Module):
    """Passes features through; the vision width must equal the LLM's hidden size."""

    def forward(self, x):
        return x


def build_projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    """Build the projector named `kind` (`linear`, `mlp{N}x_gelu` with N >= 2, `identity`)."""
    if kind == "linear":
        return MLPProjector(in_features, out_features, depth=1)
    if kind == "identity":
        if in_features != out_features:
            raise ValueError(
                f"identity projector needs vision width == LLM hidden size, got {in_features} != {out_features}"
            )
        return IdentityProjector()
    match = _MLP.match(kind)
    if match and int(match.group(1)) >= 2:
        return MLPProjector(in_features, out_features, depth=int(match.group(1)))
    raise ValueError(f"unknown projector {kind!r}: use 'linear', 'identity' or 'mlp{{N}}x_gelu' with N >= 2")


def projector_depth(kind: str) -> int:
    """Number of Linear layers in the projector named `kind` (0 for identity)."""
    if kind == "identity":
        return 0
    if kind == "linear":
        return 1
    match = _MLP.match(kind)
    if not match:
        raise ValueError(f"unknown projector {kind!r}")
    return int(match.group(1))
