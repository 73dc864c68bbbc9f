"""Benchmark: effective (non-pad) training tokens/s with sequence packing against right padding, on a
LLaVA-665K-like length mix.

The mix (drawn at full scale, `full_scale_lengths`). llava_v1_5_mix665k has 665,298 samples, ~40K of
them text-only ShareGPT conversations and the rest with one image (docs: llava-facts.md), so:

- an image sample is 576 image tokens plus text whose length is log-normal with median 120 tokens
  and sigma 0.9, clipped to 20..1400 (5th..95th percentile ~27..530, mean ~180). This is an
  assumption, not a measured histogram (none is recorded here): most of mix665k is short-answer
  VQA, OCR and region conversations, merged into a few turns per image, while LLaVA-Instruct's
  conversations and detailed descriptions reach several hundred tokens. It is the mix of
  `tests/test_packing.py` and docs/design/packing.md (which take 5% text-only samples);
- 40,000 / 665,298 = 6.0% of samples are text-only, 50..1500 tokens uniform (long multi-turn
  ShareGPT conversations; also an assumption);
- each sample is truncated to `max_length` = 2048 (LLaVA-1.5's), which this mix never reaches.

The text of every sample starts with BOS; its second half is supervised (a one-turn stand-in for
the answers of a conversation); image tokens never are.

Scaling, to keep a CPU run to a couple of minutes: every length (image tokens, text, max_length,
pack_tokens) is multiplied by the same factor, image tokens / 576, and rounded, so the padded and
packed shares are the full-scale mix's up to rounding (`tests/test_bench.py`). The default model is
`model_step`'s Llama-small (hidden 512, MLP 1376, 8 layers) behind a CLIP of hidden 192 and 2 layers at
112 px, 64 image tokens: a factor of 1/9, max_length 228. The LLM's width is scaled by about the same factor
as the lengths (4096 -> 512 against 2048 -> 228), so attention's share of the step (~T/6d) stays near
a 7B model's at 2048 tokens; its vocabulary is scaled with the width too (32000 -> 4032), since at
32000 the embedding and LM head would be half the parameters (4% at 7B), and the per-step work that
does not grow with the positions (AdamW, the dense embedding gradient) would weigh far more than in
LLaVA's training. The frozen vision tower's forward does the same work on both arms, so its share
of a step is kept at LLaVA-1.5-7B's too: CLIP-L/336 (23 blocks run, 577 tokens) is ~0.37 TFLOP per
image against ~49 TFLOP of Vicuna-7B training on a padded sample's ~1264 positions at batch 16,
0.7% of a padded step (1.1% packed); the bench's tower is 0.9% (1.5% packed) by `LlavaFlops`.
`model_step`'s CLIP-small (hidden 384, 6 layers) would be 13% (20% packed) and hold the ratio
down by a cost LLaVA's step barely has.

The step is the training step's: a `LlavaLitModule` at stage `finetune` (projector and LLM train,
frozen vision tower), its forward, backward of the mean loss, then AdamW. Batches come from the real
`LlavaCollator`, built before timing, from the same samples in the same order, so each arm processes
the same `batch` samples per step, one optimizer step per batch:

- padded: right padding to the batch's longest sample, sdpa with no mask (the causal kernel);
- packed: `pack_tokens` of batch x max_length by default, so each batch is one row holding all its
  samples back to back (`position_ids` restarting per sample, `cu_seqlens`, no attention mask), and
  the LLM's attention is `llava_varlen`: torch's varlen kernel on CUDA, one causal sdpa per sample on
  the CPU, so no sample attends to another and none computes scores over the whole row.
  `--pack-tokens 228 --attention sdpa` gives the rows of max_length under transformers'
  block-diagonal mask instead (their last row part full: 14.1% padding at batch 16).

Two models with the same initial weights take turns step by step (padded, packed, padded, ...), so
drift on a shared machine hits both. After the warm-up steps, each arm's tokens/s is its real tokens
over its total time, and the ratio is the effective tokens/s packed over padded (the same real tokens,
so the ratio of the total times). Beside it: the ratio of the positions computed (padded / packed,
pad included), what the ratio would be if a step's time were proportional to its positions. The
timed batches are a sample of the mix: one batch's positions ratio varies a lot (standard deviation
~0.28 at batch 16, by whether it holds a long sample), and 40 steps (640 samples) put the positions
ratio within ~0.05 of the mix's (seeds 0-5: 1.60-1.74 against 1.67). So the line also gives the
mix's long-run padded and packed shares and positions ratio, from 20,000 samples' lengths at full
scale.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..batch import IGNORE_INDEX
from ..data.collate import LlavaCollator
from ..model import LlavaSpec, get_preset
from ..model.packed_attention import VARLEN
from .model_step import BENCH_SPEC

FULL_IMAGE_TOKENS = 576
"""Image tokens of LLaVA-1.5 (CLIP ViT-L/14 at 336 px)."""
FULL_MAX_LENGTH = 2048
"""LLaVA-1.5's max length."""
TEXT_MEDIAN, TEXT_SIGMA, TEXT_CLIP = 120.0, 0.9, (20, 1400)
"""Text tokens of an image sample: log-normal, clipped."""
TEXT_ONLY_SHARE = 40_000 / 665_298
"""mix665k's ShareGPT share (~6.0%)."""
TEXT_ONLY_RANGE = (50, 1500)
"""Tokens of a text-only sample, uniform."""
MIX_SAMPLES = 20_000
"""Samples over which the mix's long-run padded and packed shares are reported (lengths only, no model)."""

PACKING_SPEC = copy.deepcopy(BENCH_SPEC)
PACKING_SPEC.vision.config["image_size"] = 112  # 8 x 8 patches of 14 px: 64 image tokens, 1/9 of 576
# The tower's share of a step's FLOPs as LLaVA-1.5-7B's (~0.7% padded; the module docstring).
PACKING_SPEC.vision.config.update(
    hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3
)
PACKING_SPEC.language.config["vocab_size"] = 4032  # 32000 / 8, to a multiple of 64: scaled with the width


@dataclass
class Mix:
    """One sample's full-scale lengths: text tokens (BOS included) and whether it has an image."""

    text: int
    image: bool


def full_scale_lengths(n: int, seed: int = 0) -> list[Mix]:
    """`n` samples of the LLaVA-665K-like mix at full scale (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    mixes = []
    for _ in range(n):
        if float(torch.rand((), generator=gen)) < TEXT_ONLY_SHARE:
            text = int(torch.randint(TEXT_ONLY_RANGE[0], TEXT_ONLY_RANGE[1] + 1, (), generator=gen))
            mixes.append(Mix(min(text, FULL_MAX_LENGTH), False))
        else:
            draw = torch.empty(()).log_normal_(math.log(TEXT_MEDIAN), TEXT_SIGMA, generator=gen)
            text = int(draw.clamp(*TEXT_CLIP))
            mixes.append(Mix(min(text, FULL_MAX_LENGTH - FULL_IMAGE_TOKENS), True))
    return mixes


def scaled_max_length(image_tokens: int) -> int:
    return max(1, round(FULL_MAX_LENGTH * image_tokens / FULL_IMAGE_TOKENS))


def make_samples(
    mixes: list[Mix], image_tokens: int, image_token_id: int, image_size: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Encoded samples (`input_ids`, `labels`, uint8 `pixel_values`) of `mixes` scaled to `image_tokens`
    per image: BOS, the image span (if any), text; the second half of the text supervised."""
    gen = torch.Generator().manual_seed(seed)
    scale = image_tokens / FULL_IMAGE_TOKENS
    max_length = scaled_max_length(image_tokens)
    high = max(4, min(image_token_id, 30000))  # text ids below the special ones (image, pad)
    samples = []
    for mix in mixes:
        n_img = image_tokens if mix.image else 0
        text = min(max(2, round(mix.text * scale)), max_length - n_img)
        ids = torch.randint(3, high, (n_img + text,), generator=gen)
        ids[0] = 1
        ids[1 : 1 + n_img] = image_token_id
        labels = ids.clone()
        labels[: len(ids) - text // 2] = IGNORE_INDEX
        pixels = torch.randint(
            0, 256, (int(mix.image), 3, image_size, image_size), generator=gen, dtype=torch.uint8
        )
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels})
    return samples


def fill(lengths: list[int], capacity: int, batch: int) -> tuple[float, float]:
    """Padded-token shares (padded, packed) of `lengths` in batches of `batch` (no model, any scale),
    with the collator's row layout (`data.packing`)."""
    from ..data.packing import first_fit_decreasing, row_width

    real = padded = packed = 0
    for start in range(0, len(lengths), batch):
        chunk = lengths[start : start + batch]
        real += sum(chunk)
        padded += len(chunk) * max(chunk)
        rows = first_fit_decreasing(chunk, capacity)
        packed += len(rows) * row_width(chunk, rows, capacity)
    return 1 - real / padded, 1 - real / packed


def _real_tokens(b: dict[str, Any]) -> int:
    return int(b["attention_mask"].sum())


def _step(lit, optimizer, data: dict[str, Any]) -> float:
    start = time.perf_counter()
    lit(data).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(
    spec: LlavaSpec | None = None,
    batch: int = 16,
    steps: int = 40,
    warmup: int = 1,
    pack_tokens: int | None = None,
    seed: int = 0,
    attention: str = VARLEN,
) -> dict[str, Any]:
    """Time `warmup + steps` batches through both arms, taking turns; see the module docstring.

    Returns the figures and, under `batches`, the collated (padded, packed) pairs."""
    from ..module import LlavaLitModule

    torch.manual_seed(seed)
    padded_lit = LlavaLitModule(
        spec=copy.deepcopy(spec or PACKING_SPEC), stage="finetune", projector_artifact=None
    )
    packed_spec = copy.deepcopy(spec or PACKING_SPEC)
    packed_spec.language.attn_implementation = attention
    packed_lit = LlavaLitModule(spec=packed_spec, stage="finetune", projector_artifact=None)
    packed_lit.load_state_dict(padded_lit.state_dict())
    model = padded_lit.model
    n_img, size = model.vision_tower.num_tokens, model.vision_tower.image_size
    max_length = scaled_max_length(n_img)
    pack_tokens = pack_tokens or batch * max_length
    n = (warmup + steps) * batch
    mixes = full_scale_lengths(n, seed)
    samples = make_samples(mixes, n_img, model.image_token_id, size, seed)
    pad_id = model.tokenizer.pad_token_id
    pad = LlavaCollator(pad_id, image_token_id=model.image_token_id)
    pack = LlavaCollator(pad_id, pack_tokens=pack_tokens, image_token_id=model.image_token_id)
    chunks = [samples[i : i + batch] for i in range(0, n, batch)]
    batches = [(pad(c), pack(c)) for c in chunks]

    lits = (padded_lit, packed_lit)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-5) for m in lits]
    for m in lits:
        m.train()
    times: list[tuple[float, float]] = []
    for i, pair in enumerate(batches):  # ABAB: padded then packed, on the same samples
        t = tuple(_step(m, o, b) for m, o, b in zip(lits, optimizers, pair))
        if i >= warmup:
            times.append(t)

    timed = batches[warmup:]
    real = [_real_tokens(p) for p, _ in timed]
    # The mix's long-run shares at full scale (the timed batches are a small sample of it).
    mix = [m.text + (FULL_IMAGE_TOKENS if m.image else 0) for m in full_scale_lengths(MIX_SAMPLES, seed)]
    mix_padded, mix_packed = fill(mix, FULL_MAX_LENGTH * pack_tokens // max_length, batch)

    def arm(k: int) -> dict[str, float]:
        positions = sum(pair[k]["input_ids"].numel() for pair in timed)
        return {
            "tokens_per_s": sum(real) / sum(t[k] for t in times),
            "step_s": statistics.median(t[k] for t in times),
            "pad_share": 1 - sum(real) / positions,
            "rows": statistics.mean(len(pair[k]["input_ids"]) for pair in timed),
            "real_tokens": sum(_real_tokens(pair[k]) for pair in timed),
            "supervised": sum(int(pair[k]["supervised_positions"].numel()) for pair in timed),
        }

    return {
        "padded": arm(0),
        "packed": arm(1),
        # Effective tokens/s packed over padded: the same real tokens, so the ratio of the total times.
        "ratio": sum(t[0] for t in times) / sum(t[1] for t in times),
        # What the ratio would be if a step's time were proportional to its positions (pad included).
        "positions_ratio": sum(p["input_ids"].numel() for p, _ in timed)
        / sum(q["input_ids"].numel() for _, q in timed),
        "batch": batch,
        "steps": steps,
        "image_tokens": n_img,
        "max_length": max_length,
        "pack_tokens": pack_tokens,
        "mix_pad_share": (mix_padded, mix_packed),
        "mix_positions_ratio": (1 - mix_packed) / (1 - mix_padded),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "attention": (
            getattr(model.language_model.config, "_attn_implementation", None),
            getattr(packed_lit.model.language_model.config, "_attn_implementation", None),
        ),
        "batches": batches,
    }


def format_line(r: dict[str, Any]) -> str:
    """The `[packing]` line of `make bench`."""
    pad, pk = r["padded"], r["packed"]
    mix_pad, mix_pack = r["mix_pad_share"]
    return (
        f"[packing] LLaVA-665K-like mix scaled {r['image_tokens']}/{FULL_IMAGE_TOKENS} (max_length "
        f"{r['max_length']}), {r['params_m']:.0f}M params, {torch.get_num_threads()} threads, batch "
        f"{r['batch']}, {r['steps']} timed steps: "
        f"padded ({r['attention'][0]}) {pad['tokens_per_s']:.0f} tok/s (pad {pad['pad_share']:.1%}, "
        f"{pad['rows']:.1f} rows/step), packed (pack_tokens {r['pack_tokens']}, {r['attention'][1]}) "
        f"{pk['tokens_per_s']:.0f} tok/s (pad {pk['pad_share']:.1%}, {pk['rows']:.1f} rows/step), "
        f"ratio {r['ratio']:.2f} (goal >= 1.5; positions padded / packed {r['positions_ratio']:.2f}); "
        f"the mix over {MIX_SAMPLES} samples at full scale: pad {mix_pad:.1%} / {mix_pack:.1%}, "
        f"positions ratio {r['mix_positions_ratio']:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per arm (default 40)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first (default 1)")
    parser.add_argument("--batch", type=int, default=16, help="samples per step (LLaVA-1.5: 16 per GPU)")
    parser.add_argument(
        "--pack-tokens",
        type=int,
        default=None,
        help="packed row length (default: batch x max_length, one row per batch)",
    )
    parser.add_argument(
        "--attention",
        default=VARLEN,
        help=f"the packed arm's attention (default {VARLEN}: one causal sdpa per sample on CPU; sdpa: "
        "transformers' block-diagonal mask over each row)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset", default=None, help="a model preset (e.g. tiny) instead of the bench model"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = get_preset(args.preset) if args.preset else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    r = run(spec, args.batch, args.steps, args.warmup, args.pack_tokens, args.seed, args.attention)
    print(f"{format_line(r)}; load average {load:.1f}", flush=True)


if __name__ == "__main__":
    main()
