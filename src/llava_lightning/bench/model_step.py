"""Benchmark: one training step (forward + backward + AdamW) of `LlavaModel` vs transformers' Llava.

Both hold the same weights (ours exported with `save_hf`, loaded by `LlavaForConditionalGeneration`)
and see the same batch: a ~60M-parameter CLIP + Llama config, 4 x 512 tokens of which 256 per
sample are image tokens, in two compositions: `half` (the answer half of the text is supervised) and
`all` (every text token is supervised). Ours also gets the collator's positions (`image_positions`,
`supervised_positions`), as in training. Steps alternate between the two models so drift on a shared
machine hits both; the median of the timed steps is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch

from ..batch import flat_positions, supervised_positions
from ..model import LanguageSpec, LlavaModel, LlavaSpec, VisionSpec

COMPOSITIONS = ("half", "all", "every")
"""What is supervised: the answer half of each sample's text, all of its text, or every position, image
tokens included (no LLaVA data does that; it bounds the LM head's work, like text-only data supervised
throughout)."""

BENCH_SPEC = LlavaSpec(
    vision=VisionSpec(
        name="bench-clip",
        config={
            "model_type": "clip_vision_model",
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "image_size": 224,
            "patch_size": 14,
        },
    ),
    projector="mlp2x_gelu",
    language=LanguageSpec(
        name="bench-llama",
        tokenizer="tiny:llama",
        config={
            "model_type": "llama",
            "vocab_size": 32000,
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "max_position_embeddings": 2048,
        },
    ),
)


def make_batch(
    model: LlavaModel, batch: int, seq: int, seed: int = 0, supervised: str = "half"
) -> dict[str, torch.Tensor]:
    """`batch` samples of `seq` tokens: BOS, one image span, a prompt, then a supervised answer
    (`supervised="half"`), or BOS, the image span and supervised text (`"all"`), or every position
    supervised (`"every"`)."""
    if supervised not in COMPOSITIONS:
        raise ValueError(f"supervised must be one of {COMPOSITIONS}, got {supervised!r}")
    g = torch.Generator().manual_seed(seed)
    n_img = model.vision_tower.num_tokens
    ids = torch.randint(3, 30000, (batch, seq), generator=g)
    ids[ids == model.image_token_id] = 3  # text never holds the image token (its count must match)
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = model.image_token_id
    labels = ids.clone()
    answer_start = 1 + n_img + (seq - 1 - n_img) // 2 if supervised == "half" else 1 + n_img
    if supervised != "every":
        labels[:, :answer_start] = -100
    size = model.vision_tower.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "labels": labels,
    }


def step_positions(model: LlavaModel, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys `LlavaCollator(image_token_id=...)` adds to a batch (found on the CPU)."""
    return {
        "image_positions": flat_positions(data["input_ids"] == model.image_token_id),
        "supervised_positions": supervised_positions(data["labels"]),
    }


def _step(run, optimizer, device: str) -> float:
    start = time.perf_counter()
    loss = run()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def matmul_seconds(dtype: torch.dtype, device: str, n: int = 1024, repeat: int = 3) -> float:
    """Time of one n x n matmul in `dtype` (to tell whether this CPU has native bf16 matrix units)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def compare(
    batch: int, seq: int, steps: int, warmup: int, precision: str, device: str, supervised: str = "half"
) -> dict[str, float]:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    ours = LlavaModel.from_spec(BENCH_SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_hf(tmp)
        theirs = LlavaForConditionalGeneration.from_pretrained(tmp)
    ours.train().to(device)
    theirs.train().to(device)
    cpu = make_batch(ours, batch, seq, supervised=supervised)
    data = {k: v.to(device) for k, v in cpu.items()}
    positions = {k: v.to(device) for k, v in step_positions(ours, cpu).items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def run_ours():
        with autocast:
            return ours(**data, **positions, return_logits=False).loss

    def run_theirs():
        with autocast:
            return theirs(**data).loss

    with torch.no_grad(), autocast:
        diff = (ours(**data).loss - theirs(**data).loss).abs().item()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-5)
    times_ours, times_theirs = [], []
    for i in range(warmup + steps):
        t_ours = _step(run_ours, opt_ours, device)
        t_theirs = _step(run_theirs, opt_theirs, device)
        if i >= warmup:
            times_ours.append(t_ours)
            times_theirs.append(t_theirs)
    params = sum(p.numel() for p in ours.parameters())
    return {
        "params_m": params / 1e6,
        "ours_s": statistics.median(times_ours),
        "theirs_s": statistics.median(times_theirs),
        "initial_loss_diff": diff,
    }


def preset_build_seconds(name: str = "tiny") -> float:
    LlavaModel.from_preset(name)  # imports and tokenizer cache warm
    start = time.perf_counter()
    LlavaModel.from_preset(name)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--supervised", nargs="+", default=["half", "all"], choices=COMPOSITIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(f"[model] tiny preset build (imports warm): {preset_build_seconds():.2f} s (spec: < 2 s)")
    for precision in args.precision:
        batch, steps, warmup = args.batch, args.steps, args.warmup
        if precision == "bf16" and args.device == "cpu":
            fp32 = matmul_seconds(torch.float32, "cpu")
            bf16 = matmul_seconds(torch.bfloat16, "cpu")
            if bf16 > fp32:
                # Without native bf16 matrix units (AVX512-BF16/AMX) bf16 matmuls are emulated and
                # far slower than fp32; the full-size step would take many minutes, so shrink it.
                batch, steps, warmup = 1, 1, 0
                print(
                    f"[model] this CPU has no fast bf16 matmul (1024^3: bf16 {bf16 * 1e3:.0f} ms vs fp32 "
                    f"{fp32 * 1e3:.0f} ms, capability {torch.backends.cpu.get_cpu_capability()}): "
                    "bf16 step measured at batch 1, one step"
                )
        for supervised in args.supervised:
            r = compare(batch, args.seq, steps, warmup, precision, args.device, supervised)
            print(
                f"[model] train step {precision:>4} on {args.device}, {r['params_m']:.0f}M params, "
                f"batch {batch}x{args.seq}, supervised {supervised}: LlavaModel {r['ours_s']:.3f} s, "
                f"transformers Llava {r['theirs_s']:.3f} s, ratio {r['ours_s'] / r['theirs_s']:.3f} "
                f"(goal <= 1.0); initial loss diff {r['initial_loss_diff']:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
