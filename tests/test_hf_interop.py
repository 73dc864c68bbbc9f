"""Export to / import from transformers' llava-hf format: logits parity through AutoProcessor, round trips."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_lightning import LlavaModel
from llava_lightning.model import get_preset


def _image(seed=0, w=100, h=80):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-siglip"])
def test_save_hf_loads_in_transformers_with_equal_logits(preset, tmp_path):
    model = LlavaModel.from_preset(preset).eval()
    model.save_hf(tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    prompts = [
        "USER: <image>\nWhat colour is the circle? ASSISTANT:",
        "USER: <image>\nDescribe it. ASSISTANT: A red",
    ]
    inputs = processor(images=[_image(0), _image(1, 60, 90)], text=prompts, return_tensors="pt", padding=True)
    n_image = (inputs["input_ids"] == model.image_token_id).sum(dim=1)
    assert n_image.tolist() == [model.vision_tower.num_tokens] * 2
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        theirs = hf(**inputs, labels=labels)
        ours = model(**inputs, labels=labels)
    # fp32, same weights, same kernels: stated tolerance 1e-4 (observed: exactly equal).
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-4)


def test_from_hf_then_save_hf_is_lossless(tmp_path):
    model = LlavaModel.from_preset("tiny")
    model.save_hf(tmp_path / "a")
    again = LlavaModel.from_hf(tmp_path / "a")
    assert again.image_token_id == model.image_token_id
    assert again.vision_tower.feature_layer == -2 and again.vision_tower.select_strategy == "default"
    assert again.vision_tower.image_mean == pytest.approx(model.vision_tower.image_mean)
    mine, theirs = model.state_dict(), again.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    again.save_hf(tmp_path / "b")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer.get_vocab() == model.tokenizer.get_vocab()


def test_save_hf_refuses_what_transformers_cannot_hold(tmp_path):
    timm_model = LlavaModel.from_preset("tiny-timm")
    with pytest.raises(ValueError, match="TimmWrapper"):
        timm_model.save_hf(tmp_path)
    spec = get_preset("tiny")
    spec.projector = "mlp3x_gelu"
    with pytest.raises(ValueError, match="mlp3x_gelu"):
        LlavaModel.from_spec(spec).save_hf(tmp_path)
    assert not any(tmp_path.iterdir())
