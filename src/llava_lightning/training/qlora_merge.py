"""Export of a `qlora` run: the LoRA adapters merged into un-quantized base weights, in full precision.

peft's own `merge_and_unload` on a 4-bit layer re-quantizes the merged weight (a second rounding, and a
4-bit export); here each adapted layer becomes a plain `nn.Linear` holding `W + scaling * B @ A`, where
the base `W` is

- `original`: the base model's own weights, reloaded from `pretrained` (a llava-hf checkpoint) or from the
  spec's hub name or folder (`spec.*.config` unset);
  used only where they are the weights the run quantized (their 4-bit rounding matches the checkpoint's
  packed weights: `MATCH_TOLERANCE`);
- `dequantized`: the checkpoint's 4-bit weights expanded (random-init specs, or by choice): the exported
  model then computes exactly what the adapted model computed, bar the compute dtype's rounding.

`auto` takes `original` where the spec names weights, else `dequantized`, and logs which and why.
Layers stored in 4 or 8 bit without adapters are expanded the same way.
"""

from __future__ import annotations

import logging
from typing import Literal

from torch import nn

from ..model import LlavaModel, LlavaSpec
from .quantization import dequantized_weight, is_4bit

log = logging.getLogger(__name__)

MergeBase = Literal["auto", "original", "dequantized"]

MATCH_TOLERANCE = 0.25
"""Most mean |W - dequant(W)| / mean |W| of a layer for `W` to count as the weights the run quantized:
NF4 with blocks of 64 rounds Gaussian weights with about 0.09 of it (FP4 about 0.12), other weights of
the same scale give about 1.4."""


def merge_qlora(
    model: LlavaModel, spec: LlavaSpec, base: MergeBase = "auto", pretrained: str | None = None
) -> str:
    """Replace `model.language_model` (peft over 4-bit layers) by the plain transformers LM with the
    adapters merged, and expand an 8-bit vision tower; returns which base weights were used."""
    lm = model.language_model
    if not hasattr(lm, "get_base_model"):
        raise ValueError("merge_qlora: the language model carries no LoRA adapters (not a qlora run)")
    inner = lm.get_base_model()
    originals, why = None, "chosen (--qlora_base dequantized)"
    if base != "dequantized":
        originals, why = _original_language_model(spec, inner, pretrained)
        if originals is None and base == "original":
            raise ValueError(f"export --qlora_base original: the original base weights cannot be used: {why}")
    used = "original" if originals is not None else "dequantized"
    count = _merge_into_linears(inner, originals)
    for attr in ("is_loaded_in_4bit", "peft_config"):  # what quantizing and peft set on the LM (peft's
        inner.__dict__.pop(attr, None)  # own unload drops peft_config too)
    model.language_model = inner
    log.info("qlora export: %d LLM linear layers merged into %s base weights (%s)", count, used, why)
    _expand_8bit_tower(model, spec)
    return used


def _original_language_model(
    spec: LlavaSpec, inner: nn.Module, pretrained: str | None = None
) -> tuple[nn.Module | None, str]:
    """The base LM rebuilt with its own weights (`pretrained`'s, else the spec's), or None and why not."""
    source = pretrained or spec.language.name
    if pretrained is not None:
        try:
            trust = spec.language.trust_remote_code
            original = LlavaModel.from_hf(pretrained, trust_remote_code=trust).language_model
        except (OSError, ValueError) as err:
            return None, f"reloading {pretrained!r} failed: {err}"
    elif spec.language.config is not None:
        return None, "the spec builds the LLM from a config (random init): no original weights exist"
    else:
        from ..model.language_model import build_language_model

        try:
            original, _, _ = build_language_model(spec.language, load_weights=True)
        except (OSError, ValueError) as err:
            return None, f"rebuilding {source!r} failed: {err}"
    for name, module in inner.named_modules():
        if not is_4bit(module):
            continue
        name = name.removesuffix(".base_layer")  # peft's wrapper holds the 4-bit layer as `base_layer`
        try:
            weight = original.get_submodule(name).weight.detach().float()
        except AttributeError:
            return None, f"{source!r} has no layer {name!r}"
        deq = dequantized_weight(module).float()
        if weight.shape != deq.shape:
            return (
                None,
                f"{source!r} layer {name!r} is {tuple(weight.shape)}, not {tuple(deq.shape)}",
            )
        error = float((weight - deq).abs().mean() / weight.abs().mean().clamp(min=1e-12))
        if error > MATCH_TOLERANCE:
            return None, (
                f"{source!r} is not what the run quantized (layer {name!r}: relative error "
                f"{error:.2f} > {MATCH_TOLERANCE}); its weights changed since"
            )
    return (
        original,
        f"rebuilt from {source!r}; every layer matches the checkpoint's 4-bit weights",
    )


def _merge_into_linears(inner: nn.Module, originals: nn.Module | None) -> int:
    """Swap each LoRA-over-4-bit layer (and each bare 4-bit layer) of `inner` for an `nn.Linear`."""
    from peft.tuners.lora import LoraLayer

    dtype = inner.get_input_embeddings().weight.dtype
    swaps = []
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            swaps.append((name, module, module.get_base_layer()))
        elif is_4bit(module) and not _inside_lora(inner, name):
            swaps.append((name, None, module))
    for name, lora, quantized in swaps:
        if is_4bit(quantized):
            weight = dequantized_weight(quantized).float()
        else:  # a LoRA layer over a plain Linear (e.g. the LM head named in target_modules)
            weight = quantized.weight.detach().float()
        if originals is not None and is_4bit(quantized):
            weight = originals.get_submodule(name).weight.detach().float()
        bias = None if quantized.bias is None else quantized.bias.detach().float().clone()
        if lora is not None:
            if getattr(lora, "merged", False):
                raise ValueError(f"{name}: its adapters are already merged into the 4-bit weight")
            for adapter in lora.active_adapters:
                if adapter not in lora.lora_A:
                    continue
                weight = weight + lora.get_delta_weight(adapter).float()
                if getattr(lora, "lora_bias", {}).get(adapter) and bias is not None:
                    bias = bias + lora.lora_B[adapter].bias.detach().float()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent_name) if parent_name else inner, child, linear)
    return len(swaps)


def _inside_lora(root: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    from peft.tuners.lora import LoraLayer

    return bool(parent) and isinstance(root.get_submodule(parent), LoraLayer)


def _expand_8bit_tower(model: LlavaModel, spec: LlavaSpec) -> None:
    """An 8-bit vision tower back to float `nn.Linear`s: the original weights where the spec names them,
    else the int8 weights times their row scales."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    tower = model.vision_tower
    layers = [(n, m) for n, m in tower.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    if not layers:
        return
    original = None
    if spec.vision.config is None:
        from ..model.vision_tower import build_vision_tower

        try:
            original = build_vision_tower(spec.vision, True)
        except (OSError, ValueError) as err:
            log.warning(
                "qlora export: vision tower %r not rebuilt (%s); expanding its 8-bit weights",
                spec.vision.name,
                err,
            )
    for name, layer in layers:
        if original is not None:
            weight = original.get_submodule(name).weight.detach().float()
        else:
            scale = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
            weight = layer.weight.data.float() * scale.float().unsqueeze(1) / 127.0
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(tower.get_submodule(parent_name) if parent_name else tower, child, linear)
    log.info(
        "qlora export: %d vision-tower linear layers from %s weights",
        len(layers),
        "original" if original is not None else "8-bit",
    )
