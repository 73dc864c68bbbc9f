"""Projectors: names, key layout as in transformers, depth parsing, and the LLaVA-1.5 parameter count."""

import pytest
import torch
from torch import nn

from llava_lightning.model.projector import build_projector


def test_mlp2x_gelu_matches_transformers_layout_and_llava_count():
    proj = build_projector("mlp2x_gelu", 1024, 4096)
    assert set(proj.state_dict()) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    # LLaVA-1.5-7B's projector: 20,979,712 parameters at d = 4096
    assert sum(p.numel() for p in proj.parameters()) == 20_979_712


def test_mlp_depth_parsed_from_name_and_computes_linear_gelu_chain():
    proj = build_projector("mlp3x_gelu", 8, 16)
    seq = nn.Sequential(proj.linear_1, nn.GELU(), proj.linear_2, nn.GELU(), proj.linear_3)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(proj(x), seq(x), rtol=0, atol=0)
    assert not hasattr(proj, "linear_4")


def test_linear_and_identity():
    lin = build_projector("linear", 8, 16)
    assert set(lin.state_dict()) == {"linear_1.weight", "linear_1.bias"}
    x = torch.randn(3, 8)
    assert build_projector("identity", 8, 8)(x) is x
    with pytest.raises(ValueError, match="vision width"):
        build_projector("identity", 8, 16)


@pytest.mark.parametrize("bad", ["mlp1x_gelu", "mlp2x_relu", "conv", ""])
def test_unknown_projector_is_refused_with_the_valid_names(bad):
    with pytest.raises(ValueError, match="mlp"):
        build_projector(bad, 8, 8)
