"""QLoRA's quantized weights (bitsandbytes): the LLM's linear layers in 4 bit, the frozen vision tower's
optionally in 8 bit, done on a built `LlavaModel` (random init or loaded weights alike).

- `quantize_language_model` swaps every `nn.Linear` of the LLM but its LM head (output embeddings) for a
  `bnb.nn.Linear4bit` holding the quantized weight (quantized here, on CUDA when there is one, else on the
  CPU; the packed weights then live on the CPU until the trainer moves the model); peft puts its LoRA
  layers on top (`stages.freeze_for_qlora`).
- A checkpoint holds each 4-bit layer as bitsandbytes saves it: the packed `weight` (uint8) plus its
  quantization state (`weight.absmax`, `weight.quant_map`, `weight.nested_*`,
  `weight.quant_state.bitsandbytes__<type>`), all tensors (read with weights_only). bitsandbytes has no
  matching load, so each layer gets a load hook that rebuilds its weight from them
  (`Params4bit.from_prequantized`): `load_state_dict` (resume, `load_from_checkpoint`) restores the
  trained model exactly, not a re-quantization of something else.
- `require_kernels` probes whether bitsandbytes runs (4-bit: quantize, forward, backward; 8-bit: forward)
  on a device, and refuses the stage with what is missing and how to fix it.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
from torch import nn

from .settings import QLoraConfig

INSTALL_HINT = "pip install 'llava-lightning[qlora]' (bitsandbytes>=0.45)"


class QuantizationUnavailableError(RuntimeError):
    """bitsandbytes is missing, or cannot run the kernels a stage needs on the device it runs on."""


def compute_dtype(cfg: QLoraConfig) -> torch.dtype:
    return getattr(torch, cfg.compute_dtype)


def quantization_device() -> torch.device:
    """Where weights are quantized at build time: a CUDA device when there is one (fast; this rank's own,
    by LOCAL_RANK, so ranks do not all open a context on device 0), else the CPU. The packed result is
    kept on the CPU either way: the trainer places the model."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


# ----------------------------------------------------------------------------------- capability
@functools.cache
def kernel_problem(kind: str, device: str) -> str | None:
    """None when bitsandbytes runs `kind` (`4bit`: NF4 quantize + forward + backward in bf16; `8bit`:
    int8 forward) on `device`; else what failed, in a sentence."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        return f"bitsandbytes is not installed ({err})"
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            linear = nn.Linear(128, 64)
            x = torch.randn(4, 128, device=device, requires_grad=True)
            if kind == "4bit":
                layer = _linear4bit(linear, QLoraConfig(), device)
                y = layer(x.to(torch.bfloat16))
                y.float().sum().backward()
                ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
            else:
                layer = _linear8bit(linear, device)
                with torch.no_grad():
                    y = layer(x.detach().to(torch.float16))
                ok = bool(torch.isfinite(y).all())
    except Exception as err:  # noqa: BLE001 (any failure of the probe is the answer)
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} failed its {kind[0]}-bit probe on {device}: {err!r}"
    return None if ok else f"bitsandbytes {bnb.__version__} gave non-finite {kind[0]}-bit results on {device}"


def require_kernels(kind: str, device: torch.device | str, stage: str = "qlora", what: str = "") -> None:
    """Raise `QuantizationUnavailableError` when bitsandbytes cannot run `kind` kernels on `device`."""
    device = torch.device(device)
    problem = kernel_problem(kind, str(device))
    if problem is None:
        return
    fix = (
        f"install it: {INSTALL_HINT}"
        if "not installed" in problem
        else "install a bitsandbytes build that supports this device (CUDA GPUs have 4- and 8-bit kernels; "
        f"recent releases also run on the CPU: {INSTALL_HINT}), or train on a CUDA GPU"
    )
    raise QuantizationUnavailableError(
        f"stage {stage!r} needs bitsandbytes' {kind[0]}-bit kernels{what} on {device}, but {problem}. To fix: {fix}"
        + (
            ", or use stage 'lora' (un-quantized LLM)"
            if kind == "4bit"
            else ", or set model.qlora.vision_8bit=false"
        )
    )


# ----------------------------------------------------------------------------------- quantizing
def quantize_language_model(lm: nn.Module, cfg: QLoraConfig) -> int:
    """Swap the LLM's `nn.Linear` layers, its LM head excepted, for 4-bit ones; returns how many."""
    import bitsandbytes as bnb

    head = lm.get_output_embeddings()
    device = quantization_device()
    count = 0
    for parent in list(lm.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(parent, name, _linear4bit(child, cfg, device).to("cpu"))
                count += 1
            elif isinstance(child, bnb.nn.Linear4bit):  # already quantized (a second prepare)
                count += 1
    # peft picks its bitsandbytes LoRA layer by this flag (transformers sets it on 4-bit loads).
    lm.is_loaded_in_4bit = True
    return count


def quantize_vision_tower_8bit(tower: nn.Module) -> int:
    """Swap the (frozen) vision tower's `nn.Linear` layers for int8 ones (LLM.int8()); returns how many."""
    device = quantization_device()
    count = 0
    for parent in list(tower.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, _linear8bit(child, device).to("cpu"))
                count += 1
    return count


def _linear4bit(linear: nn.Linear, cfg: QLoraConfig, device: torch.device | str) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype(cfg),
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        device="meta",
    )
    # Quantized from the compute dtype: bitsandbytes dequantizes to the dtype it quantized from, then
    # casts to the input's (an fp32 source would mean an fp32 copy of each weight per matmul).
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.detach().to(compute_dtype(cfg)),
        requires_grad=False,
        blocksize=cfg.blocksize,
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        module=layer,
    ).to(device)  # quantizes
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    # bitsandbytes repacks a CPU layer's weight in place on its first no-grad eval forward (AVX512-BF16
    # CPUs), which fails for widths not a multiple of its tile and changes what the checkpoint sees.
    layer.support_avx512bf16_for_cpu = False
    layer.register_load_state_dict_pre_hook(_load_prequantized)
    return layer


def _linear8bit(linear: nn.Linear, device: torch.device | str) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=6.0,
        device="meta",
    )
    layer.weight = bnb.nn.Int8Params(linear.weight.data.detach(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.detach(), requires_grad=False)
    return layer.to(device)  # quantizes


def _load_prequantized(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load hook of a `Linear4bit`: rebuild its weight from the packed weight and quantization state in
    `state_dict` (on the device its weight is on now); the default load then copies the same bytes."""
    import bitsandbytes as bnb

    key = prefix + "weight"
    stats = {k[len(key) + 1 :]: v for k, v in state_dict.items() if k.startswith(key + ".")}
    if key not in state_dict or not stats:
        return  # the default load reports the missing key; a state without stats keeps the module's own
    device = module.weight.device
    module.weight = bnb.nn.Params4bit.from_prequantized(
        state_dict[key], dict(stats), requires_grad=False, device=device, module=module
    )
    for k in stats:  # bitsandbytes' extra entries: not parameters, so not unexpected keys either
        state_dict.pop(f"{key}.{k}")


def is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A `Linear4bit`'s weight `[out, in]` expanded in fp32 (levels times block scales, not rounded to the
    16-bit dtype it was quantized from, as bitsandbytes' fused no-grad kernel computes for fp32 inputs)."""
    import bitsandbytes as bnb

    weight = layer.weight
    state = copy.copy(weight.quant_state)  # shallow: only the output dtype differs
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(weight.data, state)
