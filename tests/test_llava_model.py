"""LlavaModel: feature scattering, the count check, mixed batches, the loss, and other LLM families."""

import pytest
import torch
import torch.nn.functional as F
from conftest import image_batch, sample_ids

from llava_lightning import LlavaModel


@pytest.fixture(scope="module")
def tiny():
    return LlavaModel.from_preset("tiny").eval()


def test_modules_are_named_as_in_transformers(tiny):
    names = {n for n, _ in tiny.named_children()}
    assert names == {"vision_tower", "multi_modal_projector", "language_model"}
    assert {"linear_1.weight", "linear_2.weight"} <= set(tiny.multi_modal_projector.state_dict())


def test_image_features_land_on_image_token_positions(tiny):
    ids = sample_ids(tiny, images=1)[None]
    pixels = image_batch(tiny, 1)
    embeds = tiny.embed(ids, pixels)
    features = tiny.get_image_features(pixels)[0]
    mask = ids[0] == tiny.image_token_id
    torch.testing.assert_close(embeds[0, mask], features, rtol=0, atol=0)
    text = tiny.language_model.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[0, ~mask], text[0, ~mask], rtol=0, atol=0)


def test_count_mismatch_names_both_counts(tiny):
    n = tiny.vision_tower.num_tokens
    ids = sample_ids(tiny, images=1)[None]  # 3 text ids, then the image span
    with pytest.raises(ValueError, match=rf"{n} image tokens.*{2 * n} image feature vectors"):
        tiny(ids, pixel_values=image_batch(tiny, 2))
    cut = torch.cat([ids[:, :4], ids[:, 6:]], dim=1)  # an image span cut short by 2
    with pytest.raises(ValueError, match=rf"{n - 2} image tokens.*{n} image feature vectors"):
        tiny(cut, pixel_values=image_batch(tiny, 1))
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny(ids)


def _right_pad(seqs, value):
    length = max(len(s) for s in seqs)
    return torch.stack([F.pad(s, (0, length - len(s)), value=value) for s in seqs])


def test_mixed_batch_text_only_and_two_images_equals_per_sample(tiny):
    samples = [sample_ids(tiny, images=0, text=30), sample_ids(tiny, images=2), sample_ids(tiny, images=1)]
    images = [image_batch(tiny, 0), image_batch(tiny, 2), image_batch(tiny, 1)]
    ids = _right_pad(samples, 0)
    mask = _right_pad([torch.ones_like(s) for s in samples], 0)
    with torch.no_grad():
        batch = tiny(ids, attention_mask=mask, pixel_values=torch.cat(images)).logits
        for i, (s, im) in enumerate(zip(samples, images)):
            alone = tiny(s[None], pixel_values=im if len(im) else None).logits[0]
            torch.testing.assert_close(batch[i, : len(s)], alone, rtol=1e-4, atol=1e-4)


def test_loss_is_mean_over_supervised_tokens_and_shortcut_agrees(tiny):
    ids = torch.stack([sample_ids(tiny, 1), sample_ids(tiny, 1)])
    labels = ids.clone()
    labels[ids == tiny.image_token_id] = -100
    labels[0, -5:] = -100
    pixels = image_batch(tiny, 2)
    out = tiny(ids, pixel_values=pixels, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    assert int(out.num_supervised) == int((labels[:, 1:] != -100).sum())
    fast = tiny(ids, pixel_values=pixels, labels=labels, return_logits=False)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, out.loss, rtol=1e-5, atol=1e-5)


def test_output_tensors_are_visible_to_the_sharding_wrappers_hooks(tiny):
    """FSDP2 (torch 2.11: pytree) and DeepSpeed ZeRO-3 (dicts) hook a module's output tensors to
    re-gather parameters for backward; a bare dataclass hid them (the LM head's backward crashed
    under FSDP2 on an H100)."""
    from deepspeed.runtime.zero.utils import apply_to_tensors_only
    from torch.utils._pytree import tree_flatten

    ids = sample_ids(tiny, 1)[None]
    out = tiny(ids, pixel_values=image_batch(tiny, 1), labels=ids.clone(), return_logits=False)
    leaves = [x for x in tree_flatten(out)[0] if torch.is_tensor(x)]
    assert any(x is out.loss_sum for x in leaves) and any(x is out.loss for x in leaves)
    seen = []
    apply_to_tensors_only(lambda t: seen.append(t) or t, out)
    assert any(x is out.loss_sum for x in seen)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-timm", "tiny-siglip"])
def test_other_families_train(preset):
    model = LlavaModel.from_preset(preset)
    ids = torch.stack([sample_ids(model, 1), sample_ids(model, 1)])
    labels = torch.where(ids == model.image_token_id, -100, ids)
    out = model(ids, pixel_values=image_batch(model, 2), labels=labels, return_logits=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0
    classes = model.block_classes()
    assert set(classes) == {"vision_tower", "language_model"}
    assert any(isinstance(m, classes["language_model"]) for m in model.language_model.modules())


def test_uint8_pixels_are_normalised_on_the_model_side(tiny):
    raw = torch.randint(
        0, 256, (2, 3, tiny.vision_tower.image_size, tiny.vision_tower.image_size), dtype=torch.uint8
    )
    mean = torch.tensor(tiny.vision_tower.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny.vision_tower.image_std).view(1, 3, 1, 1)
    floats = (raw.float() / 255 - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(tiny.get_image_features(raw), tiny.get_image_features(floats))


def test_text_only_batch_runs_the_tower_in_eval_only_when_sharded(tiny):
    # Sharded strategies gather parameters module by module on every rank together: a rank whose batch
    # has no image must still run the tower (on a blank image, adding zero), in validation too.
    calls = []
    hook = tiny.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    ids = sample_ids(tiny, images=0, text=20)[None]
    try:
        with torch.no_grad():
            plain = tiny.embed(ids)  # eval, not sharded: nothing extra runs
            assert calls == []
            tiny.tower_on_text_only = True
            sharded = tiny.embed(ids)
            assert calls == [1]
        torch.testing.assert_close(sharded, plain, rtol=0, atol=0)
    finally:
        tiny.tower_on_text_only = False
        hook.remove()
