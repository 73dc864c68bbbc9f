"""Analytic training FLOPs of a LLaVA model per batch: the numerator of MFU (`training/throughput.py`,
the GPU sweep).

Model FLOPs, the MFU convention: activation recomputation by gradient checkpointing is not
counted, padding tokens are not counted. Every matmul of the model is counted as 2 x MACs, like
`torch.utils.flop_counter` (what Lightning's `measure_flops` uses), for each sample's own length:

    forward   2 * (linear MACs + attention MACs), attention MACs per layer = 2 * T^2 * (heads * head_dim)
    backward  weight grads:  2 * linear MACs of every unit whose parameters train
              input grads:   2 * linear MACs + 2 * (2 * attention MACs) of every unit that some trained
                             parameter precedes, including the first trained block (its pre-norm weights
                             train); a first trained linear layer (the projector's first, under a frozen
                             tower) or patch embedding gets no input grad

applied, in order, to the vision patch embedding (per image, 576 patches for the GPU sweep's
CLIP ViT-L/14-336), the vision blocks that run (per image, 577 tokens with CLS), the projector's
linears (per image token), the LLM decoder layers (per sample, T = its token count: a right-padded
row's attention-mask length, each sample of a packed row its own) and the LM head (per supervised
token only: training runs the head on supervised positions). For the GPU sweep's model (`bench/gpu_sweep.BENCH_SPEC`) at
stage 2 (frozen tower) that is, with N the linear parameter counts:

    vision    2 * N_vision_blocks * 577 * images + 4 * 23 * 577^2 * 1024 * images   (forward only)
              + 2 * 3*14*14*1024 * 576 * images                                      (patch embedding)
    projector (2 * N_proj (fwd) + 2 * N_proj (weight grads) + 2 * N_proj2 (input grads)) * 576 * images,
              N_proj = 1024*2048 + 2048*2048, N_proj2 = 2048*2048 (its first layer's input needs no grad)
    LLM       6 * N_layers * sum(T) + 12 * 22 * 2048 * sum(T^2)
    head      6 * 2048 * 32000 * supervised tokens

Attention is counted over the full T x T square, as `flop_counter` counts SDPA (causal masking
halves the work a kernel really needs). `tests/test_throughput.py` checks this count
against Lightning's `measure_flops` on the tiny model (exact equality) for stages align, finetune,
full, and finetune with the last vision block unfrozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batch import supervised_mask


@dataclass
class _Unit:
    """One step of the chain vision -> projector -> LLM whose matmuls are counted."""

    name: str
    tokens: str
    """Which count multiplies the per-token MACs: patches, vision, image_tokens, text, supervised."""
    linear_macs: int
    """Multiply-accumulates of its weight matmuls per token."""
    first_linear_macs: int
    """Of those, the matmuls that read the unit's input directly: no input grad when nothing before them
    trains. A single linear layer's own MACs; 0 for a pre-norm block, whose norm weights feed q/k/v."""
    attn_width: int = 0
    """heads * head_dim of a self-attention over the unit's sequence (0: none)."""
    trainable: bool = False


def _linear_macs(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@dataclass
class LlavaFlops:
    """Analytic training FLOPs of a `LlavaModel` (HF vision tower, any decoder-only HF LLM) per batch."""

    units: list[_Unit]
    patches: int
    """Patch-embedding positions per image."""
    vision_seq: int
    """Tokens per image inside the tower (patches + CLS)."""
    image_tokens: int
    """Tokens per image handed to the projector and the LLM."""
    params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: nn.Module) -> LlavaFlops:
        tower, lm = model.vision_tower, model.language_model
        if not hasattr(tower, "hf_model"):
            raise NotImplementedError("the FLOP count covers transformers vision towers (CLIP, SigLIP)")
        vcfg = tower.config
        patch = int(vcfg.patch_size)
        grid = tower.image_size // patch
        embeddings = getattr(tower.hf_model, "vision_model", tower.hf_model).embeddings
        conv = embeddings.patch_embedding
        conv_macs = conv.in_channels * patch * patch * conv.out_channels
        units = [_Unit("vision.patch", "patches", conv_macs, conv_macs, 0, _trains(conv))]
        v_width = int(vcfg.hidden_size)  # CLIP/SigLIP: heads * head_dim == hidden
        for i, block in enumerate(tower.blocks()[: tower.blocks_run]):
            units.append(_Unit(f"vision.block{i}", "vision", _linear_macs(block), 0, v_width, _trains(block)))
        for i, m in enumerate(x for x in model.multi_modal_projector.modules() if isinstance(x, nn.Linear)):
            macs = m.in_features * m.out_features
            units.append(_Unit(f"projector.linear{i}", "image_tokens", macs, macs, 0, _trains(m)))
        embed = lm.get_input_embeddings()
        units.append(_Unit("llm.embed", "text", 0, 0, 0, _trains(embed)))
        lcfg = lm.config
        head_dim = getattr(lcfg, "head_dim", None) or lcfg.hidden_size // lcfg.num_attention_heads
        l_width = int(lcfg.num_attention_heads * head_dim)
        decoder = lm.get_decoder()
        layers = next(m for n, m in decoder.named_children() if isinstance(m, nn.ModuleList))
        for i, layer in enumerate(layers):
            units.append(_Unit(f"llm.layer{i}", "text", _linear_macs(layer), 0, l_width, _trains(layer)))
        head = lm.get_output_embeddings()
        head_macs = head.in_features * head.out_features
        units.append(_Unit("llm.head", "supervised", head_macs, head_macs, 0, _trains(head)))
        params = {
            "vision": sum(p.numel() for p in tower.parameters()),
            "projector": sum(p.numel() for p in model.multi_modal_projector.parameters()),
            "llm": sum(p.numel() for p in lm.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
        prefix = getattr(tower, "num_prefix_tokens", 0)
        return cls(units, grid * grid, grid * grid + prefix, tower.num_tokens, params)

    def batch_flops(self, seq_lens: list[int], n_images: int, n_supervised: int) -> dict[str, int]:
        """FLOPs of one training micro-batch, split by component (`vision`, `projector`, `llm`) and `total`."""
        tokens = {
            "patches": n_images * self.patches,
            "vision": n_images * self.vision_seq,
            "image_tokens": n_images * self.image_tokens,
            "text": sum(seq_lens),
            "supervised": n_supervised,
        }
        squares = {"vision": n_images * self.vision_seq**2, "text": sum(t * t for t in seq_lens)}
        out = {"vision": 0, "projector": 0, "llm": 0}
        grad_flows = False  # does the activation entering this unit require grad?
        for u in self.units:
            lin = u.linear_macs * tokens[u.tokens]
            first = u.first_linear_macs * tokens[u.tokens]
            attn = 2 * u.attn_width * squares.get(u.tokens, 0)  # QK^T and AV
            flops = 2 * (lin + attn)  # forward
            if u.trainable:
                flops += 2 * lin  # weight grads
            if grad_flows:
                flops += 2 * lin + 2 * (2 * attn)  # input grads; attention backward = 2x its forward
            elif u.trainable:
                flops += 2 * (lin - first) + 2 * (2 * attn)
            grad_flows = grad_flows or u.trainable
            out[u.name.split(".", 1)[0]] += flops
        out["total"] = out["vision"] + out["projector"] + out["llm"]
        return out


def sample_lengths(batch: dict[str, Any]) -> torch.Tensor:
    """`[samples]` token count of each sample of a batch, on the batch's device.

    A right-padded row is one sample of `attention_mask.sum()` tokens. A row with `position_ids`
    (`[B, T]`, packed rows) holds one sample per run of positions starting at 0; its padding
    (attention mask 0) counts for none. Without an attention mask every position counts.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    positions = batch.get("position_ids")
    if not isinstance(positions, torch.Tensor) or positions.shape != ids.shape:
        return real.sum(1)
    starts = positions == 0
    starts[:, 0] = True  # a row's first token starts a sample whatever its position id
    sample = torch.cumsum(starts.flatten().long(), 0) - 1
    # A run of padding whose position ids restart at 0 counts as a sample of 0 tokens (`batch_stats` drops it).
    return torch.bincount(sample[real.flatten()])


def batch_stats(batch: dict[str, Any]) -> dict[str, Any]:
    """Per-sample lengths, images, supervised and padded token counts of a batch (one device-to-host copy).

    `seq_lens`: tokens of each sample (`sample_lengths`, samples of 0 tokens dropped); `samples`: their
    number; `n_images`: rows of `pixel_values`; `n_supervised`: positions the loss scores
    (`batch.supervised_mask`); `padded`: every position of `input_ids`, padding included.
    """
    ids = batch["input_ids"]
    pixels = batch.get("pixel_values")
    labels = batch.get("labels")
    if ids.numel() == 0:
        lengths, supervised = [], 0
    else:
        lens = sample_lengths(batch)
        sup = (
            supervised_mask(labels).sum().view(1)
            if isinstance(labels, torch.Tensor) and labels.ndim == 2
            else lens.new_zeros(1)
        )
        *lengths, supervised = torch.cat([lens, sup.to(lens.dtype)]).tolist()
        lengths = [n for n in lengths if n > 0]
    return {
        "seq_lens": lengths,
        "n_images": 0 if pixels is None else int(pixels.shape[0]),
        "n_supervised": int(supervised),
        "padded": int(ids.numel()),
        "samples": len(lengths),
    }
