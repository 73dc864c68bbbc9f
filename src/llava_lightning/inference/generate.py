"""Batched text generation for `LlavaModel`: templates and images in, strings out.

`generate` works on text: it builds the prompt with a conversation template (`add_generation_prompt`,
the same encoder as training, so the prompt is token for token the training prefix), transforms the
images as the vision tower expects, generates with `model.generation.generate_ids` (token ids, KV
cache; it stops on the ids `eos_ids_for` computes here from the tokenizer and the template) and decodes.

It lives above both `model/` and `data/`, which never import each other: it needs the data's templates
and image transform and the model's id-level generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..data.anyres_image import AnyresTransform
from ..data.image import ImageTransform
from ..data.templates import get_template
from ..model.generation import generate_ids

if TYPE_CHECKING:
    from PIL import Image

    from ..model.llava import LlavaModel

IMAGE = "<image>"


def _as_image_list(entry: Any) -> list[Image.Image]:
    if entry is None:
        return []
    if isinstance(entry, (list, tuple)):
        return list(entry)
    return [entry]


def eos_ids_for(tokenizer: Any, template: Any) -> list[int]:
    """The tokenizer's EOS, plus the template's end-of-turn token when it is another special token
    the tokenizer knows (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    end = getattr(template, "end", None)
    if isinstance(end, str) and end:
        vocab = tokenizer.get_vocab()
        if end in vocab and int(vocab[end]) != tokenizer.unk_token_id and int(vocab[end]) not in ids:
            ids.append(int(vocab[end]))
    return ids


def save_stop_tokens(path: Any, tokenizer: Any, template: str) -> list[int]:
    """Set `generation_config.json`'s `eos_token_id` in the exported folder `path` to `eos_ids_for` of
    `template`: engines (transformers' `generate`, vLLM) stop only there, and a template whose turns end
    with another token than the tokenizer's EOS (ChatML, Llama-3) would otherwise run past the reply."""
    from transformers import GenerationConfig

    ids = eos_ids_for(tokenizer, get_template(template))
    try:
        config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json written
        config = GenerationConfig()
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    config.save_pretrained(path)
    return ids


def generate(
    model: LlavaModel,
    images: Sequence[Any],
    prompts: Sequence[str],
    template: str = "vicuna_v1",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    aspect: str = "pad",
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replies to `prompts` (user texts), one per prompt, stripped.

    `images[i]` is None, a PIL image or a list of PIL images for prompt i; each image becomes a
    `<image>\\n` line in front of the prompt (LLaVA's layout). The prompt is the template's
    generation prompt (`add_generation_prompt=True`), left-padded with the tokenizer's pad id.
    Anyres models (`model.anyres`) tile each image (`aspect` does not apply) and give each its own count.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts (need one per prompt)")
    if not prompts:
        return []
    tokenizer = model.tokenizer
    tmpl = get_template(template)
    tower, anyres = model.vision_tower, getattr(model, "anyres", None)
    if anyres is not None:
        transform: Any = AnyresTransform(anyres, tower.image_mean, tower.image_std)
    else:
        transform = ImageTransform.from_tower(tower, aspect)

    encoded: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for entry, prompt in zip(images, prompts):
        imgs = _as_image_list(entry)
        conversation = [{"from": "human", "value": (IMAGE + "\n") * len(imgs) + prompt}]
        if anyres is not None:
            image_sizes = [transform.image_size(img) for img in imgs]
            num_tokens: Any = [anyres.num_tokens(h, w) for h, w in image_sizes]
            sizes += image_sizes
        else:
            num_tokens = tower.num_tokens
        enc = tmpl.encode(
            conversation, tokenizer, num_tokens, num_images=len(imgs), add_generation_prompt=True
        )
        encoded.append(enc["input_ids"])
        pixels += [transform(img) for img in imgs]

    eos = eos_ids_for(tokenizer, tmpl)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    length = max(len(e) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, e in enumerate(encoded):
        if e:
            input_ids[i, length - len(e) :] = torch.tensor(e, dtype=torch.long)
            attention_mask[i, length - len(e) :] = 1
    if not pixels:
        pixel_values = None
    else:  # anyres: each image several crops
        pixel_values = torch.cat(pixels) if anyres is not None else torch.stack(pixels)

    out = generate_ids(
        model,
        input_ids,
        attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_ids=eos,
        use_cache=use_cache,
        generator=generator,
        pad_token_id=pad,
        image_sizes=torch.tensor(sizes, dtype=torch.long) if anyres is not None and sizes else None,
    )
    texts = []
    eos_set = set(eos)
    for row in out.tolist():
        cut = next((k for k, t in enumerate(row) if t in eos_set), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return texts
