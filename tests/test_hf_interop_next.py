"""LLaVA-NeXT anyres in `LlavaModel` against transformers' `LlavaNextForConditionalGeneration` on tiny
configs: logits with the same weights, `save_hf` to a llava-next folder transformers loads (and whose
`LlavaNextProcessor` reproduces our inputs), `from_hf` of a transformers-written folder, round trips."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from llava_lightning import LlavaModel
from llava_lightning.data.anyres_image import AnyresTransform
from llava_lightning.model import get_preset
from llava_lightning.model.hf_interop import to_hf_state_dict
from llava_lightning.model.hf_interop_next import build_hf_next_config
from llava_lightning.model.presets import TINY_CLIP, TINY_LLAMA, TINY_NEXT_PINPOINTS

PROMPTS = [
    "USER: <image>\nWhat colour is the circle? ASSISTANT:",
    "USER: <image>\nDescribe it. <image>\nAnd this? ASSISTANT: A red",
]


def _image(seed=0, w=100, h=80):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


# landscape (1 x 2 crops), portrait (2 x 1, unpadded columns), small square (2 x 2)
IMAGES = [(0, 250, 110), (1, 70, 190), (2, 60, 60)]


def _images():
    return [_image(seed, w, h) for seed, w, h in IMAGES]


def _our_inputs(model):
    """`PROMPTS` encoded by our side: each `<image>` expanded to its count, crops from `AnyresTransform`."""
    tok, geometry = model.tokenizer, model.anyres
    transform = AnyresTransform(geometry, model.vision_tower.image_mean, model.vision_tower.image_std)
    images = _images()
    rows, k = [], 0
    for prompt in PROMPTS:
        ids = []
        for i, piece in enumerate(prompt.split("<image>")):
            if i:
                h, w = transform.image_size(images[k])
                ids += [model.image_token_id] * geometry.num_tokens(h, w)
                k += 1
            ids += tok(piece, add_special_tokens=i == 0 and True)["input_ids"]
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)], mask[r, : len(ids)] = torch.tensor(ids), 1
    pixel_values = torch.cat([transform(img) for img in images])
    sizes = torch.tensor([transform.image_size(img) for img in images])
    return input_ids, mask, pixel_values, sizes


def _hf_from_ours(model):
    config = build_hf_next_config(model)
    hf = LlavaNextForConditionalGeneration(config).eval()
    state = to_hf_state_dict(model)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def test_anyres_logits_equal_llava_next_with_the_same_weights():
    model = LlavaModel.from_preset("tiny-next").eval()
    hf = _hf_from_ours(model)
    input_ids, mask, crops, sizes = _our_inputs(model)
    labels = input_ids.masked_fill(mask == 0, -100)
    # transformers takes [num_images, max_crops, 3, S, S], zero-padded past each image's crops.
    per_image = torch.split(crops, [model.anyres.num_crops(h, w) for h, w in sizes.tolist()])
    padded = torch.nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
    with torch.no_grad():
        theirs = hf(
            input_ids=input_ids, attention_mask=mask, pixel_values=padded, image_sizes=sizes, labels=labels
        )
        ours = model(input_ids, mask, crops, labels, image_sizes=sizes)
        by_index = model(
            input_ids, mask, crops, labels, image_feature_index=model.anyres.feature_index(sizes)
        )
    # fp32, same weights: stated tolerance 1e-4.
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-4)
    assert torch.equal(by_index.logits, ours.logits)


def test_anyres_refuses_mismatched_sizes_and_tokens():
    model = LlavaModel.from_preset("tiny-next").eval()
    input_ids, mask, crops, sizes = _our_inputs(model)
    with pytest.raises(ValueError, match="image_sizes"):
        model(input_ids, mask, crops)
    with pytest.raises(ValueError, match="crops"):
        model(input_ids, mask, crops[:-1], image_sizes=sizes)
    short = input_ids.clone()
    short[0, (short[0] == model.image_token_id).nonzero()[0]] = 5  # one image token fewer
    with pytest.raises(ValueError, match="do not match"):
        model(short, mask, crops, image_sizes=sizes)
    spec = get_preset("tiny-next")
    spec.vision.select_strategy = "full"
    with pytest.raises(ValueError, match="square grid"):
        LlavaModel.from_spec(spec)


def test_anyres_text_only_training_step_reaches_every_trainable_parameter():
    model = LlavaModel.from_preset("tiny-next").train()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model(ids, torch.ones_like(ids), None, ids)
    out.loss.backward()
    assert model.image_newline.grad is not None and torch.count_nonzero(model.image_newline.grad) == 0


def test_save_hf_next_loads_in_transformers_with_equal_logits(tmp_path):
    model = LlavaModel.from_preset("tiny-next").eval()
    model.save_hf(tmp_path)
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, LlavaNextProcessor)
    inputs = processor(images=_images(), text=PROMPTS, return_tensors="pt", padding=True)
    ids, mask, crops, sizes = _our_inputs(model)
    # The processor reproduces our inputs: the same image-token runs, image sizes and crops.
    assert torch.equal(inputs["image_sizes"], sizes)
    assert torch.equal(
        (inputs["input_ids"] == model.image_token_id).sum(1), (ids == model.image_token_id).sum(1)
    )
    n = [model.anyres.num_crops(h, w) for h, w in sizes.tolist()]
    theirs_crops = torch.cat([p[:k] for p, k in zip(inputs["pixel_values"], n)])
    torch.testing.assert_close(theirs_crops, crops, rtol=0, atol=1e-5)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        theirs = hf(**inputs, labels=labels)
        ours = model(**inputs, labels=labels)  # transformers' [images, max crops, 3, S, S] layout
        flat = model(inputs["input_ids"], inputs["attention_mask"], crops, labels, image_sizes=sizes)
    torch.testing.assert_close(ours.logits, flat.logits, rtol=0, atol=1e-4)  # pixels equal up to 1e-7
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-4)


def _transformers_written_folder(path, tokenizer):
    """A tiny llava-next folder written by transformers itself (random init, its own processor)."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        vision_config={k: v for k, v in TINY_CLIP.items() if k != "model_type"},
        text_config={**TINY_LLAMA},
        image_token_index=image_id,
        image_grid_pinpoints=[list(p) for p in TINY_NEXT_PINPOINTS],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(3)
    hf = LlavaNextForConditionalGeneration(config).eval()
    hf.save_pretrained(path)
    tile = TINY_CLIP["image_size"]
    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": tile},
            crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=[list(p) for p in TINY_NEXT_PINPOINTS],
        ),
        tokenizer=tokenizer,
        patch_size=TINY_CLIP["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return hf


def test_from_hf_of_a_transformers_written_llava_next_folder(tmp_path, tiny_llama):
    hf = _transformers_written_folder(tmp_path, tiny_llama)
    model = LlavaModel.from_hf(tmp_path).eval()
    assert model.anyres is not None and model.image_grid_pinpoints == [list(p) for p in TINY_NEXT_PINPOINTS]
    assert torch.equal(model.image_newline, hf.model.image_newline)
    processor = AutoProcessor.from_pretrained(tmp_path)
    inputs = processor(images=_images(), text=PROMPTS, return_tensors="pt", padding=True)
    n = [model.anyres.num_crops(h, w) for h, w in inputs["image_sizes"].tolist()]
    crops = torch.cat([p[:k] for p, k in zip(inputs["pixel_values"], n)])
    with torch.no_grad():
        theirs = hf(**inputs)
        ours = model(inputs["input_ids"], inputs["attention_mask"], crops, image_sizes=inputs["image_sizes"])
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-4)


def test_llava_next_round_trip_is_lossless(tmp_path):
    model = LlavaModel.from_preset("tiny-next")
    model.save_hf(tmp_path / "a")
    again = LlavaModel.from_hf(tmp_path / "a")
    assert again.image_grid_pinpoints == model.image_grid_pinpoints
    mine, theirs = model.state_dict(), again.state_dict()
    assert set(mine) == set(theirs) and "image_newline" in mine
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    again.save_hf(tmp_path / "b")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("image_newline") for k in a)  # transformers writes its own key layout


def test_llava_1_5_folders_still_load_as_llava(tmp_path):
    model = LlavaModel.from_preset("tiny")
    model.save_hf(tmp_path)
    again = LlavaModel.from_hf(tmp_path)
    assert again.anyres is None and again.image_newline is None


def test_anyres_greedy_generation_equals_transformers_generate(tmp_path):
    """`generate_ids` (KV cache, left padding) of the anyres model == `LlavaNextForConditionalGeneration.generate`
    on the processor's inputs (greedy, same weights); `inference.generate` runs end to end on images."""
    from llava_lightning.inference.generate import generate
    from llava_lightning.model.generation import _suppressed_ids, generate_ids

    model = LlavaModel.from_preset("tiny-next").eval()
    model.save_hf(tmp_path)
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=_images(), text=PROMPTS, return_tensors="pt", padding=True)
    # Ours never emits ids past the tokenizer (the padded vocabulary) or the image / pad ids: same for theirs.
    limit, banned = _suppressed_ids(model, hf.config.text_config.vocab_size)
    suppress = list(range(limit, hf.config.text_config.vocab_size)) + list(banned)
    with torch.no_grad():
        theirs = hf.generate(
            **inputs, max_new_tokens=6, do_sample=False, min_new_tokens=6, suppress_tokens=suppress
        )
    ours = generate_ids(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        image_sizes=inputs["image_sizes"],
        max_new_tokens=6,
        eos_token_ids=[],
    )
    assert torch.equal(ours, theirs[:, inputs["input_ids"].shape[1] :])
    replies = generate(model, [_images()[0], None], ["What colour is the circle?", "Hi"], max_new_tokens=3)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_pretrained_llava_next_folder_starts_a_run_and_builds_a_meta_skeleton(tmp_path, tiny_llama):
    """`--model.pretrained` of a llava-next folder: the run's model is anyres with the folder's weights;
    `load_weights=False` under the meta device (sharded init) gives the same keys with no storage."""
    from llava_lightning.module import LlavaLitModule

    hf = _transformers_written_folder(tmp_path, tiny_llama)
    lit = LlavaLitModule(pretrained=str(tmp_path), template="vicuna_v1", stage="finetune")
    assert lit.model.anyres is not None and lit.model.image_newline.requires_grad
    assert torch.equal(lit.model.image_newline, hf.model.image_newline)
    with torch.device("meta"):
        skeleton = LlavaModel.from_hf(tmp_path, load_weights=False)
    assert skeleton.anyres is not None and all(p.is_meta for p in skeleton.parameters())
    assert set(skeleton.state_dict()) == set(lit.model.state_dict())
