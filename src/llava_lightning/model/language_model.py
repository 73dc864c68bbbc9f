"""The language model half: any `AutoModelForCausalLM` and its tokenizer, given an `<image>` token.

The tokenizer gets a dedicated `<image>` special token (and a pad token if it has none); the
embedding matrix is resized only when the tokenizer outgrew it, rounded up as llava-hf does.
"""

from __future__ import annotations

import logging

from torch import nn

from .packed_attention import VARLEN, register_varlen_attention
from .shapes import full_shape
from .specs import LanguageSpec

log = logging.getLogger(__name__)


def load_tokenizer(spec: LanguageSpec):
    """The tokenizer named by the spec (hub/path, or `tiny:llama` / `tiny:chatml` built offline)."""
    source = spec.tokenizer or spec.name
    if source.startswith("tiny:"):
        from .tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer(source.split(":", 1)[1])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        source, use_fast=spec.use_fast_tokenizer, trust_remote_code=spec.trust_remote_code
    )


def add_image_token(tokenizer, image_token: str = "<image>", pad_token: str = "<pad>") -> int:
    """Give the tokenizer `image_token` (and `pad_token` when it has no pad); return the image-token id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    return tokenizer.convert_tokens_to_ids(image_token)


def build_language_model(spec: LanguageSpec, load_weights: bool = True) -> tuple[nn.Module, object, int]:
    """(causal LM, tokenizer, image-token id) for the spec; embeddings resized to fit the tokenizer.

    `load_weights=False` builds a hub-named model from its config alone (random init; under
    `torch.device("meta")` an empty skeleton whose weights are loaded later, after sharding).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(spec)
    image_token_id = add_image_token(tokenizer, spec.image_token, spec.pad_token)
    kwargs: dict = {"trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation is not None:
        if spec.attn_implementation == VARLEN:
            register_varlen_attention()
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.config is not None:
        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type", "llama"), **cfg)
        lm = AutoModelForCausalLM.from_config(config, **kwargs)
    elif not load_weights:
        config = AutoConfig.from_pretrained(spec.name, trust_remote_code=spec.trust_remote_code)
        lm = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        lm = AutoModelForCausalLM.from_pretrained(spec.name, **kwargs)
    vocab = full_shape(lm.get_input_embeddings().weight)[0]
    if len(tokenizer) > vocab:
        log.info("resizing %s embeddings %d -> %d (+ padding)", type(lm).__name__, vocab, len(tokenizer))
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=spec.pad_vocab_to_multiple_of)
    return lm, tokenizer, image_token_id


def decoder_block_class(lm: nn.Module) -> type[nn.Module]:
    """The LLM's decoder-layer class, from transformers' `_no_split_modules` declaration."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    for module in lm.modules():
        if type(module).__name__ in names:
            return type(module)
    raise ValueError(f"{type(lm).__name__} declares no decoder-layer class (_no_split_modules)")
