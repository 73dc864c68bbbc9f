"""Projector files: the original LLaVA `mm_projector.bin` (stage-1 output) and our safetensors artifact."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from llava_lightning import LlavaModel


@pytest.fixture(scope="module")
def tiny():
    return LlavaModel.from_preset("tiny")


def _llava_sequential(tiny):
    """What LLaVA's builder makes for mlp2x_gelu: nn.Sequential(Linear, GELU, Linear)."""
    hidden = tiny.language_model.config.hidden_size
    return nn.Sequential(
        nn.Linear(tiny.vision_tower.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)
    )


def test_mm_projector_bin_from_llava_loads_and_computes_the_same(tiny, tmp_path):
    seq = _llava_sequential(tiny)
    state = {f"model.mm_projector.{k}": v for k, v in seq.state_dict().items()}
    torch.save(state, tmp_path / "mm_projector.bin")
    tiny.init_projector_from(tmp_path / "mm_projector.bin")
    x = torch.randn(2, 7, tiny.vision_tower.hidden_size)
    torch.testing.assert_close(tiny.multi_modal_projector(x), seq(x), rtol=0, atol=0)


def test_safetensors_artifact_round_trip(tiny, tmp_path):
    state = {k: torch.randn_like(v) for k, v in tiny.multi_modal_projector.state_dict().items()}
    save_file(state, tmp_path / "projector.safetensors")
    tiny.init_projector_from(tmp_path / "projector.safetensors")
    for k, v in tiny.multi_modal_projector.state_dict().items():
        assert torch.equal(v, state[k])


def test_projector_depth_mismatch_says_what_to_set(tiny, tmp_path):
    linear = {"model.mm_projector.weight": torch.zeros(4, 4), "model.mm_projector.bias": torch.zeros(4)}
    torch.save(linear, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="set `projector`"):
        tiny.init_projector_from(tmp_path / "mm_projector.bin")
    with pytest.raises(FileNotFoundError):
        tiny.init_projector_from(tmp_path / "missing.bin")


def test_our_artifact_writes_its_json_and_the_json_is_checked_on_load(tiny, tmp_path):
    import json

    from llava_lightning.model.projector_io import save_projector_artifact

    state = {k: torch.randn_like(v) for k, v in tiny.multi_modal_projector.state_dict().items()}
    path = save_projector_artifact(tmp_path / "p.safetensors", state, tiny.projector_type, global_step=7)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {"projector": "mlp2x_gelu", "global_step": 7}
    tiny.init_projector_from(path)
    assert all(torch.equal(v, state[k]) for k, v in tiny.multi_modal_projector.state_dict().items())
    # A JSON naming another projector type: refused before the weights are read, with what to set.
    path.with_suffix(".json").write_text(json.dumps({"projector": "mlp3x_gelu"}))
    with pytest.raises(ValueError, match="'mlp3x_gelu' projector.*set `projector`"):
        tiny.init_projector_from(path)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="p.json: not the JSON"):
        tiny.init_projector_from(path)
