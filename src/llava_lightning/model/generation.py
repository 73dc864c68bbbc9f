"""Batched generation on token ids for `LlavaModel`: greedy or temperature / top-p sampling, with a KV cache.

`generate_ids` works on token ids: prompts are LEFT-padded, position ids come from the attention
mask (`cumsum - 1`, clamped at 0), so every row computes exactly what it would compute alone. With
`use_cache=True` the first step runs the whole prompt (the image features are scattered in by
`LlavaModel.forward`) and keeps the language model's KV cache; later steps feed only the newest token,
whose keys and values join the cache (the image features live in the cache, so `pixel_values` are
passed on the first step only). With `use_cache=False` every step reruns the whole sequence, images
included: slow, and the reference the cached path must match.

The image placeholder id (and any vocabulary padding rows beyond the tokenizer) is never generated:
the image id carries no meaning without pixels.

Text in, text out (conversation templates, image transforms, decoding) is `inference.generate`, above
both the model and the data.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .llava import LlavaModel

log = logging.getLogger(__name__)


def _lm_forward_params(model: LlavaModel) -> set[str]:
    try:
        return set(inspect.signature(model.language_model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return set()


def _cache_kwarg(params: set[str]) -> str:
    """The language model's KV-cache argument: `cache` (transformers >= 5.x) or `past_key_values`."""
    return "cache" if "cache" in params else "past_key_values"


def _suppressed_ids(model: LlavaModel, vocab: int) -> tuple[int, list[int]]:
    """(first id beyond the tokenizer, [image id]): ids that must never be generated."""
    limit = vocab
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        try:
            limit = min(vocab, len(tokenizer))
        except TypeError:  # pragma: no cover - a tokenizer without __len__
            pass
    return limit, [int(model.image_token_id)]


def _next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`[B, V]` float logits -> `[B]` token ids (argmax, or a sample from softmax(logits / T), top-p)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token is always kept).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    device = probs.device
    if generator is not None and generator.device != device:
        probs = probs.to(generator.device)
    picked = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return picked.to(device)


def generate_ids(
    model: LlavaModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] | int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    pad_token_id: int | None = None,
    image_sizes: torch.Tensor | None = None,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
) -> torch.Tensor:
    """New tokens `[B, n]` (`n <= max_new_tokens`) for LEFT-padded prompts `input_ids [B, T]`.

    Each row's EOS is kept and followed by `pad_token_id` (default: the tokenizer's pad id, else the
    first EOS id). Generation stops when every row has produced an EOS or after `max_new_tokens`.
    `eos_token_ids` defaults to the tokenizer's EOS. Greedy when `temperature == 0`, else sampling
    from `softmax(logits / temperature)` restricted to the top-p mass, drawn with `generator`.
    `pixel_values` hold the images in order (sample 0's first), as for `LlavaModel.forward`; anyres models
    take their `image_sizes` too. `on_token(tokens [B])` is called after each step (streaming); returning
    True stops generation there.
    The model runs in eval mode under `torch.no_grad()`; its previous mode is restored afterwards.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

    tokenizer = getattr(model, "tokenizer", None)
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_token_ids = [] if eos is None else [eos]
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos_list = [int(e) for e in eos_token_ids]
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_list[0] if eos_list else 0

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if bool((attention_mask[:, :-1] > attention_mask[:, 1:]).any()):
        raise ValueError("generate_ids needs LEFT-padded prompts (the attention mask has a 1 before a 0)")
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
        if pixel_values.is_floating_point():
            tower_param = next(model.vision_tower.parameters(), None)
            if tower_param is not None and tower_param.is_floating_point():
                pixel_values = pixel_values.to(tower_param.dtype)

    if max_new_tokens == 0 or batch == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=device)

    params = _lm_forward_params(model)
    cache_name = _cache_kwarg(params)
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    eos_tensor = torch.tensor(eos_list, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids, mask = input_ids, attention_mask
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            cache: Any = None
            new_tokens: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                if not use_cache or step == 0:
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    out = model(
                        ids,
                        attention_mask=mask,
                        pixel_values=pixel_values,
                        image_sizes=image_sizes,
                        position_ids=positions,
                        use_cache=use_cache,
                        **extra,
                    )
                else:
                    positions = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
                    out = model(
                        ids[:, -1:],
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=True,
                        **{cache_name: cache},
                        **extra,
                    )
                if use_cache:
                    cache = out.cache
                    if cache is None:
                        raise RuntimeError(f"{type(model.language_model).__name__} returned no KV cache")
                logits = out.logits[:, -1].float()
                limit, banned = _suppressed_ids(model, logits.shape[-1])
                logits[:, limit:] = float("-inf")
                logits[:, banned] = float("-inf")
                token = _next_tokens(logits, temperature, top_p, generator)
                token = torch.where(done, torch.full_like(token, pad_token_id), token)
                new_tokens.append(token)
                if eos_list:
                    done = done | torch.isin(token, eos_tensor)
                stop = on_token is not None and bool(on_token(token))
                if stop or bool(done.all()) or step == max_new_tokens - 1:
                    break
                ids = torch.cat([ids, token[:, None]], dim=1)
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    finally:
        model.train(was_training)
    result = torch.stack(new_tokens, dim=1)
    log.debug("generated %d tokens for %d prompts (%d finished)", result.shape[1], batch, int(done.sum()))
    return result
