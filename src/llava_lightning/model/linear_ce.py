"""LM head + cross-entropy over the supervised rows, in chunks: no `[rows, vocab]` logits tensor at once.

`linear_cross_entropy(hidden, head, targets)` is `F.cross_entropy(head(hidden).float(), targets,
reduction="sum")` computed `chunk` rows at a time. For a plain `nn.Linear` head it computes the
gradients of the hidden rows and of the head's weight (and bias) chunk by chunk during the forward
and keeps only those (`[rows, hidden]` and `[vocab, hidden]`), so neither the forward nor the
backward holds more than one chunk's logits, and no matmul runs twice. A head whose weight is not
a whole tensor during the forward (a DeepSpeed ZeRO-3 partition, a DTensor, a wrapper such as a
LoRA layer) is called as a module instead, each chunk under activation checkpointing (its logits
are recomputed in the backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CE_CHUNK_ROWS = 2048
"""Rows (supervised positions) per chunk: with a 32k vocabulary one chunk's fp32 logits take 256 MiB."""


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk: int = CE_CHUNK_ROWS
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (`[N, H]` rows) against `targets` (`[N]`), in fp32."""
    if chunk < 1:
        raise ValueError(f"the cross-entropy chunk must be >= 1 row, got {chunk}")
    if _whole_linear(head):
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
    if hidden.shape[0] <= chunk:
        return _chunk_loss(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, head, hidden[rows], targets[rows], use_reentrant=False)
    return total


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _whole_linear(head: nn.Module) -> bool:
    # The weight is read outside the module's call: only where it is a full plain tensor now (ZeRO-3
    # gathers a partition only inside the module's own forward; its parameters carry `ds_id`).
    if type(head) is not nn.Linear:
        return False
    weight = head.weight
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2 and not hasattr(weight, "ds_id")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE of `hidden @ weight.T + bias`; the gradients are computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Weight and bias gradients add up over chunks in fp32 whatever the compute dtype.
        grad_weight = grad_bias = None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, t = hidden[rows], targets[rows]
            logits = F.linear(h, weight, bias)  # autocast applies here as in the module
            # One fused pass for log-softmax, one in place for the softmax (the CE backward's cost).
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            total = total - log_probs.gather(1, t[:, None]).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(sum CE)/d logits = softmax - one_hot(target), in the logits' dtype for the matmuls.
            g = log_probs.exp_()
            g.scatter_add_(1, t[:, None], torch.full_like(t[:, None], -1, dtype=g.dtype))
            g = g.to(logits.dtype)
            del logits, log_probs
            if need_hidden:
                grad_hidden[rows] = (g @ weight.to(g.dtype)).to(hidden.dtype)
            if need_weight:
                if grad_weight is None:
                    grad_weight = (g.t() @ h.to(g.dtype)).float()
                elif g.dtype == torch.float32:  # accumulate inside the matmul, no [vocab, hidden] temporary
                    grad_weight.addmm_(g.t(), h.float())
                else:
                    grad_weight += (g.t() @ h.to(g.dtype)).float()
            if need_bias:
                part = g.float().sum(0)
                grad_bias = part if grad_bias is None else grad_bias.add_(part)
        if need_weight and grad_weight is None:  # no rows
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        if need_bias and grad_bias is None:
            grad_bias = torch.zeros_like(bias, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_out).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * grad_out).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
        )
