"""Attention over packed rows (several samples per row): which language-model backends keep the
samples apart, the arguments each needs, and `llava_varlen`, torch's varlen kernel registered with
transformers' `AttentionInterface`.

- `sdpa`, `eager`, `flex_attention`: transformers derives a per-sample causal mask from `position_ids`
  that restart at 0 (`masking_utils.find_packed_sequence_indices`), but only when `attention_mask`
  is None and no KV cache is passed.
- `flash_attention_*` (flash-attn or a hub kernel) and `llava_varlen`: the segments come from
  `cu_seq_lens_q/k` and `max_length_q/k`, over the rows laid end to end (transformers' own
  position-id detection for flash covers one row only).
"""

from __future__ import annotations

from typing import Any

import torch

VARLEN = "llava_varlen"
"""`--model.spec.language.attn_implementation` of per-sample attention over packed rows: torch's varlen
kernel (`torch.nn.attention.varlen`) on CUDA, one causal sdpa call per sample elsewhere."""

MASKED = frozenset({"sdpa", "eager", "flex_attention"})
"""Backends that keep packed samples apart through transformers' packed-sequence mask."""


def packed_lm_kwargs(attn_implementation: str | None, cu_seqlens: Any, max_seqlen: Any) -> dict[str, Any]:
    """Keyword arguments for the language model's forward on a packed batch (`attention_mask=None`)."""
    # A KV cache (config.use_cache defaults to True) turns transformers' packed-sequence detection off.
    kwargs: dict[str, Any] = {"use_cache": False}
    name = attn_implementation or "sdpa"
    if name in MASKED:
        return kwargs
    if name == VARLEN or "flash" in name:
        if cu_seqlens is None or max_seqlen is None:
            raise ValueError(
                f"attention {name!r} needs the packed batch's cu_seqlens and max_seqlen (LlavaCollator with "
                "pack_tokens builds them) to keep packed samples apart"
            )
        max_seqlen = int(max_seqlen)
        return {
            **kwargs,
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_seqlen,
            "max_length_k": max_seqlen,
        }
    raise ValueError(
        f"packed batches (data.pack_tokens) cannot keep samples apart with attention {name!r}: set "
        f"model.spec.language.attn_implementation to one of {', '.join(sorted(MASKED | {VARLEN}))} or "
        "flash_attention_2, or train without data.pack_tokens"
    )


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each `cu_seq_lens_q` segment of the rows laid end to end, through
    `torch.nn.attention.varlen.varlen_attn` on CUDA and `segment_attention` elsewhere; without
    segments (padded batches, generation) it is sdpa.

    `query` `[B, H, T, D]`, `key` / `value` `[B, H_kv, T, D]`; returns `[B, T, H, D]` as transformers'
    attention functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError(f"{VARLEN} has no attention dropout; set the model's attention_dropout to 0")
    batch, heads, length, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    gqa = k.shape[1] != heads
    if uses_varlen_kernel(q):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        out = varlen_attn(
            q,
            k,
            v,
            cu,
            cu,
            int(max_length_q),
            int(max_length_q),
            scale=scaling,
            window_size=(-1, 0),  # causal
            enable_gqa=gqa,
        )
    else:
        out = segment_attention(q, k, v, cu_seq_lens_q, scaling, gqa)
    return out.view(batch, length, heads, dim), None


def uses_varlen_kernel(query: torch.Tensor) -> bool:
    """Whether `llava_varlen` runs torch's varlen kernel for this query (CUDA) or `segment_attention`."""
    return query.is_cuda


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None,
    gqa: bool,
) -> torch.Tensor:
    """Causal sdpa of each segment `cu_seqlens[i]:cu_seqlens[i+1]` alone; `q` `[tokens, H, D]`, `k` / `v`
    `[tokens, H_kv, D]`, returns `[tokens, H, D]`. Where the varlen kernel does not run (CPU): exact,
    and each sample computes its own n x n scores, not the row's W x W of a block-diagonal mask."""
    bounds = cu_seqlens.tolist() if cu_seqlens.device.type == "cpu" else cu_seqlens.cpu().tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        seg = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(
            *seg, is_causal=True, scale=scale, enable_gqa=gqa
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
    # No 2-D mask (packed rows, or unpadded): no mask, the kernel takes the segments or is causal;
    # a padding mask (padded batches, generation): sdpa's 4-D mask, for the sdpa fallback.
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Register `llava_varlen` with transformers (idempotent); needed before a model is built with it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
