"""Throughput, peak memory and MFU of LLaVA training under each sharding strategy: the GPU sweep.

One run per strategy: the real CLI (`python -m llava_lightning fit -c conf/stage2.yaml -c OVERLAY -c
conf/strategy/<s>.yaml`) trains stage 2 (projector + LLM, frozen tower, gradient checkpointing) on
synthetic-shapes data for a few steps, with the `StepThroughput` callback (`bench/throughput.py`: the
training callback `LlavaThroughput` over the steps after a warm-up) appending one JSON line to a
results file. `run_all` then prints a markdown
table and writes it next to the results.

Two modes share every line of that path:

- `GPU`: a ~1.4B-parameter random-init LLaVA on one CUDA device, 20 steps, strategies fsdp2, fsdp,
  deepspeed_zero2, deepspeed_zero3, each in bf16 (the strategy YAMLs' precision: fsdp2 keeps fp32
  master weights and computes in bf16, the others run bf16-mixed). Vision tower: CLIP ViT-L/14-336
  shapes (hidden 1024, 24 layers, 16 heads, MLP 4096, 336 px, patch 14: 576 image tokens, 23 blocks
  run for feature layer -2). LLM: TinyLlama-1.1B shapes (hidden 2048, 22 layers, 32 heads, 4 KV heads,
  MLP 5632, vocab 32000). The tokenizer is the offline `tiny:llama` one (about 1000 pieces with `<image>`
  and `<pad>`); the LLM's 32000-row vocabulary is larger than it needs (the unused rows are never
  indexed, but the LM head still computes all 32000 logits per supervised token, as a real
  Llama-vocabulary model does). Parameters: vision 303M, projector 6.3M, LLM 1.10B.
- `SMOKE`: the `tiny` preset on CPU in fp32, 3 steps, strategies ddp and fsdp2 (one process each):
  the same CLI, overlay, callback, results file and table, so the GPU script is not an untested stub.
- `GPU_SPEED` (`--mode gpu-speed`): the same model, data and steps under fsdp2, as a ladder of
  variants each adding one thing: `baseline` (padded batches, every layer checkpointed, LLaVA's
  recipe), `packed` (`--data.pack_tokens 2048`, transformers' packed-sequence mask), `packed-varlen`
  (`--data.pack_tokens 32768`: each batch one row, torch's varlen kernel), `packed-varlen-no-ckpt` (no
  activation checkpointing),
  `packed-varlen-no-ckpt-compile` (`--model.compile true`), on text lengths drawn as LLaVA-665K's
  (`mix665k_like`: the synthetic conversations are short, so they would hide what padding costs).
  `SMOKE_SPEED` runs baseline, packed, packed-varlen (one sdpa per sample on CPU) and
  packed-varlen-no-ckpt on CPU.
- `GPU_QLORA` (`--mode gpu-qlora`): QLoRA stage 2 (`--model.stage qlora`: LLM linear layers in NF4 with
  double quantization and bf16 compute, LoRA r 128 / alpha 256 on every one, projector trained, tower
  frozen; docs/qlora.md) at LLaVA-1.5-7B shapes (random init: CLIP ViT-L/14-336 as above, Vicuna-7B:
  hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), batch 8, every layer checkpointed, bf16-mixed,
  one device under ddp.yaml, 10 steps: does it fit the memory of a 24 GB card (`QLORA_MEMORY_GIB`, checked
  on the peak reserved memory)? `SMOKE_QLORA`: the same run with the tiny model on CPU. Its MFU counts
  the frozen 4-bit weights' gradient FLOPs as a full fine-tune's (`training/flops.py`), so it is high.

FLOPs come from `training/flops.py` (`LlavaFlops`; the count is documented there). Tests: `tests/gpu/`.

    python -m llava_lightning.bench.gpu_sweep                   # GPU mode (--strategies fsdp2 fsdp ...)
    python -m llava_lightning.bench.gpu_sweep --smoke           # the tiny model on CPU
    python -m llava_lightning.bench.gpu_sweep --mode gpu-speed  # the speed ladder (GPU_SPEED)
    python -m llava_lightning.bench.gpu_sweep --mode gpu-qlora  # QLoRA 7B on one GPU (GPU_QLORA)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.synthetic import generate

REPO = Path(__file__).resolve().parents[3]

CLIP_VIT_L_14_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
}
TINYLLAMA_1_1B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
VICUNA_7B = {
    **TINYLLAMA_1_1B,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}
BENCH_SPEC = {
    "vision": {
        "name": "clip-vit-large-patch14-336-random",
        "config": CLIP_VIT_L_14_336,
        "feature_layer": -2,
        "select_strategy": "default",
    },
    "projector": "mlp2x_gelu",
    "language": {"name": "tinyllama-1.1b-random", "config": TINYLLAMA_1_1B, "tokenizer": "tiny:llama"},
}
LLAVA_7B_SPEC = {
    **BENCH_SPEC,
    "language": {"name": "vicuna-7b-random", "config": VICUNA_7B, "tokenizer": "tiny:llama"},
}
QLORA_MEMORY_GIB = 23.0
"""What a QLoRA run's peak reserved memory must stay under to fit a 24 GB card (24 GiB less the CUDA
context and what other processes hold)."""


@dataclass
class Mode:
    """What one sweep trains, and where: one run per strategy, or per variant (`variants`) under one."""

    name: str
    strategies: tuple[str, ...]
    steps: int
    warmup: int
    batch_size: int
    num_workers: int
    accelerator: str
    model: dict[str, Any]
    extra_flags: tuple[str, ...] = ()
    """CLI flags after the strategy YAML, for every run."""
    strategy_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """CLI flags for one strategy's run (listed under the table)."""
    timeout_s: int = 240
    budget_s: int | None = None
    """The whole sweep must finish within this (None: no limit)."""
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Label -> CLI flags: one run per variant under `strategies[0]` instead of one per strategy."""
    lengths: str = "shapes"
    """Training text lengths: `shapes` (the synthetic conversations, short) or `665k` (`mix665k_like`)."""
    stage: str = "finetune"
    """The model's stage (`model.stage`): finetune (projector + LLM) or qlora."""

    def runs(self, only: tuple[str, ...] | None = None) -> list[tuple[str, str, tuple[str, ...]]]:
        """(label, strategy, flags after the strategy YAML) of each run, in order; `only` picks labels."""
        if self.variants:
            planned = [(v, self.strategies[0], (*self.extra_flags, *f)) for v, f in self.variants.items()]
        else:
            planned = [(s, s, (*self.extra_flags, *self.strategy_flags.get(s, ()))) for s in self.strategies]
        if only:
            unknown = set(only) - {label for label, _, _ in planned}
            if unknown:
                raise ValueError(f"mode {self.name} has no run {sorted(unknown)}: {[p[0] for p in planned]}")
            planned = [p for p in planned if p[0] in only]
        return planned


GPU = Mode(
    name="gpu",
    strategies=("fsdp2", "fsdp", "deepspeed_zero2", "deepspeed_zero3"),
    steps=20,
    warmup=5,
    batch_size=16,
    num_workers=4,
    accelerator="gpu",
    model={"preset": None, "spec": BENCH_SPEC},
    timeout_s=150,
    budget_s=480,  # the four runs in under 8 minutes on one H100
)
# Issue 16's speed ladder on the same model and data, each step on top of the one before: LLaVA's
# recipe (padded, every layer checkpointed), packed rows of 2048 (transformers' packed mask), each
# batch one row under torch's varlen kernel (16 x 2048 tokens at most: no padding), no checkpointing,
# compiled blocks.
_PACKED = ("--data.pack_tokens=2048",)
_VARLEN = ("--data.pack_tokens=32768", "--model.spec.language.attn_implementation=llava_varlen")
_NO_CKPT = ("--model.activation_checkpointing.vision=none", "--model.activation_checkpointing.language=none")
SPEED_VARIANTS = {
    "baseline": (),
    "packed": _PACKED,
    "packed-varlen": _VARLEN,
    "packed-varlen-no-ckpt": (*_VARLEN, *_NO_CKPT),
    "packed-varlen-no-ckpt-compile": (*_VARLEN, *_NO_CKPT, "--model.compile=true"),
}
GPU_SPEED = replace(
    GPU,
    name="gpu-speed",
    strategies=("fsdp2",),
    timeout_s=180,  # the compiled run compiles 22 decoder layers first
    variants=SPEED_VARIANTS,
    lengths="665k",
)
# QLoRA stage 2 at LLaVA-1.5-7B shapes on one device: does it fit a 24 GB card?
GPU_QLORA = replace(
    GPU,
    name="gpu-qlora",
    strategies=("ddp",),
    steps=10,
    warmup=3,
    batch_size=8,  # per step; LLaVA's 16 per device is 2 steps of accumulation
    model={"preset": None, "spec": LLAVA_7B_SPEC},
    stage="qlora",
    timeout_s=420,  # building 7B in fp32 on the host and quantizing it take a minute or two
    budget_s=480,
)
SMOKE = Mode(
    name="smoke",
    strategies=("ddp", "fsdp2"),
    steps=3,
    warmup=1,
    batch_size=4,
    num_workers=0,
    accelerator="cpu",
    model={"preset": "tiny", "spec": None},
    # fp32 on CPU; FSDP2's bf16 casting policy off (a CPU without bf16 matrix units emulates it).
    extra_flags=("--trainer.precision=32-true",),
    strategy_flags={
        "fsdp2": ("--trainer.strategy.param_dtype=null", "--trainer.strategy.frozen_vision_dtype=null")
    },
    timeout_s=180,
)
# The speed ladder's code path with the tiny model on CPU (llava_varlen runs one sdpa per sample there),
# compiling left out (inductor's C++ build takes minutes here; tests/test_lean_step.py compiles the tiny
# model's blocks with fullgraph=True).
SMOKE_SPEED = replace(
    SMOKE,
    name="smoke-speed",
    strategies=("fsdp2",),
    extra_flags=(*SMOKE.extra_flags, *SMOKE.strategy_flags["fsdp2"]),
    strategy_flags={},
    variants={
        "baseline": (),
        "packed": _PACKED,
        "packed-varlen": _VARLEN,
        "packed-varlen-no-ckpt": (*_VARLEN, *_NO_CKPT),
    },
    lengths="665k",
)
SMOKE_QLORA = replace(SMOKE, name="smoke-qlora", strategies=("ddp",), strategy_flags={}, stage="qlora")
MODES = {m.name: m for m in (GPU, GPU_SPEED, GPU_QLORA, SMOKE, SMOKE_SPEED, SMOKE_QLORA)}


def make_data(out: Path, mode: Mode) -> Path:
    """Instruction data with enough samples for one epoch of `mode.steps` batches: the synthetic
    shapes set, and for `lengths="665k"` also `instruct/mix665k_like.json` (`mix665k_like`); returns
    the training JSON."""
    n = (mode.steps + 2) * mode.batch_size
    if not (out / "instruct" / "llava_instruct.json").exists():
        generate(out, seed=0, n_captions=4, n_instruct=n, n_eval=4, shard_size=4, n_mc_train=4, n_val=4)
    if mode.lengths == "shapes":
        return out / "instruct" / "llava_instruct.json"
    if mode.lengths != "665k":
        raise ValueError(f"lengths must be shapes or 665k, got {mode.lengths!r}")
    path = out / "instruct" / "mix665k_like.json"
    if not path.exists():
        path.write_text(json.dumps(mix665k_like(out / "instruct", n)))
    return path


def mix665k_like(instruct: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` LLaVA-format records whose Vicuna-encoded text lengths follow `bench.packing`'s LLaVA-665K-like
    mix (6% text-only; image samples 576 image tokens at LLaVA-1.5 scale plus log-normal text), over
    the synthetic images in `instruct`. The answer is filler words sized, with the offline `tiny:llama`
    tokenizer, so that the encoded text (template, question and answer) comes within a few tokens of
    the drawn length; a drawn length below the template's own tokens (~40) gets a one-word answer."""
    from ..data.templates import get_template
    from ..model.language_model import add_image_token
    from ..model.tiny_tokenizer import build_tiny_tokenizer
    from .packing import full_scale_lengths

    tokenizer = build_tiny_tokenizer("llama")
    add_image_token(tokenizer)
    template = get_template("vicuna_v1")
    images = sorted(
        r["image"]
        for r in json.loads((instruct / "llava_instruct.json").read_text())
        if isinstance(r.get("image"), str)
    )
    words = ("red", "blue", "green", "circle", "square", "star", "top", "left", "center", "shape")

    def conversation(image: bool, n_words: int) -> list[dict[str, str]]:
        question = "<image>\nDescribe the image in detail." if image else "Tell me about shapes."
        answer = " ".join(words[i % len(words)] for i in range(n_words))
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    def text_tokens(image: bool, n_words: int) -> int:
        return len(template.encode(conversation(image, n_words), tokenizer, num_image_tokens=0)["input_ids"])

    # (tokens of a one-word answer, tokens per further word), per kind: image or text-only.
    sizes = {
        image: (text_tokens(image, 1), (text_tokens(image, 101) - text_tokens(image, 1)) / 100)
        for image in (True, False)
    }
    records = []
    for i, mix in enumerate(full_scale_lengths(n, seed)):
        base, per_word = sizes[mix.image]
        n_words = max(1, 1 + round((mix.text - base) / per_word))
        record: dict[str, Any] = {
            "id": f"mix665k-like-{i:06d}",
            "conversations": conversation(mix.image, n_words),
        }
        if mix.image:
            record["image"] = images[i % len(images)]
        records.append(record)
    return records


def overlay(mode: Mode, label: str, train_json: Path, workdir: Path, results: Path) -> Path:
    """The config file laid over conf/stage2.yaml (JSON, which YAML reads)."""
    cfg = {
        "trainer": {
            "accelerator": mode.accelerator,
            "devices": 1,
            "num_nodes": 1,
            "max_steps": mode.steps,
            "max_epochs": -1,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(workdir / label),
            "callbacks": [
                {
                    "class_path": "llava_lightning.bench.throughput.StepThroughput",
                    "init_args": {"results": str(results), "label": label, "warmup": mode.warmup},
                }
            ],
        },
        "model": {
            **mode.model,
            "stage": mode.stage,
            "gradient_checkpointing": True,
            "init_projector": None,
        },
        "data": {
            "train": [
                {
                    "kind": "instruct",
                    "path": str(train_json),
                    "image_root": str(train_json.parent),
                }
            ],
            "val": None,
            "batch_size": mode.batch_size,
            "num_workers": mode.num_workers,
        },
    }
    path = workdir / f"overlay-{label}.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_strategy(
    mode: Mode,
    label: str,
    strategy: str,
    flags: tuple[str, ...],
    train_json: Path,
    workdir: Path,
    results: Path,
    logs: Path,
) -> dict[str, Any]:
    """One `fit` subprocess; returns {strategy (the run's label), returncode, wall_s, log, flags}
    (+ error: its last error line)."""
    strategy_yaml = REPO / "conf" / "strategy" / f"{strategy}.yaml"
    log = logs / f"{label}.log"
    if not strategy_yaml.exists():
        log.write_text(f"{strategy_yaml} does not exist\n")
        return {
            "strategy": label,
            "flags": flags,
            "returncode": None,
            "wall_s": 0.0,
            "log": str(log),
            "error": "no such YAML",
        }
    cmd = [
        sys.executable, "-m", "llava_lightning", "fit",
        "-c", str(REPO / "conf" / "stage2.yaml"),
        "-c", str(overlay(mode, label, train_json, workdir, results)),
        "-c", str(strategy_yaml),
        *flags,
    ]  # fmt: skip
    env = {
        **os.environ,
        # The package from this checkout (also where it is not installed): the CLI and the callback.
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if mode.accelerator == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=mode.timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    run = {
        "strategy": label,
        "flags": flags,
        "returncode": rc,
        "wall_s": time.perf_counter() - start,
        "log": str(log),
    }
    if rc != 0:
        errors = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x or "Exception" in x]
        run["error"] = errors[-1].strip()[:300] if errors else ""
    return run


def _trains(mode: Mode) -> str:
    if mode.stage == "qlora":  # the LLM's parameter count is of its stored elements (4-bit: 2 per byte)
        return "qlora: projector + LoRA over an NF4 LLM train; LLM params as stored"
    return "projector + LLM train"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(mode: Mode, records: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """Markdown table of the results, with a header naming the card, the date and the setup."""
    by_name = {r["strategy"]: r for r in records}
    first = records[0] if records else {}
    params = first.get("params", {})
    mem = first.get("peak_mem_kind", "peak memory")
    lines = [
        f"Device: {first.get('device', '?')}; {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"mode {mode.name}: {mode.steps} steps ({mode.warmup} warm-up), batch {mode.batch_size}, stage 2 "
        f"({_trains(mode)}){'' if mode.variants else ', gradient checkpointing'}; params vision {params.get('vision', 0) / 1e6:.0f}M, "
        f"projector {params.get('projector', 0) / 1e6:.1f}M, LLM {params.get('llm', 0) / 1e6:.0f}M "
        f"(trainable {params.get('trainable', 0) / 1e6:.0f}M); MFU vs {first.get('peak_source', '?')}.",
        "",
        f"| {'run' if mode.variants else 'strategy'} | precision | tokens/s | step time (s) | TFLOP/s | MFU % | {mem} (GiB) | reserved (GiB) "
        "| vision+proj FLOP share | run wall (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        r = by_name.get(run["strategy"])
        if r is None:
            why = f"failed (exit {run['returncode']}): {run.get('error', '')} (log {run['log']})".replace(
                "|", "/"
            )
            lines.append(f"| {run['strategy']} | {why} |||||||| {run['wall_s']:.0f} |")
            continue
        mfu = _fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f")  # None: no peak known for the card
        lines.append(
            f"| {r['strategy']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['step_time_s']:.3f} "
            f"| {r['tflops_per_s_per_device']:.2f} | {mfu} | {r['peak_mem_gib']:.2f} "
            f"| {_fmt(r['peak_reserved_gib'], '.2f')} | {100 * r['vision_projector_flops_share']:.1f}% "
            f"| {run['wall_s']:.0f} |"
        )
    under = f" (each under `conf/strategy/{mode.strategies[0]}.yaml`)" if mode.variants else ""
    flags = [f"{run['strategy']}: `{' '.join(run['flags']) or '-'}`" for run in runs]
    lines += ["", f"Flags after the strategy YAML{under}: " + "; ".join(flags)]
    return "\n".join(lines)


def run_all(
    mode: Mode, workdir: Path, strategies: tuple[str, ...] | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Run every strategy or variant of `mode` (`strategies` picks labels; data, overlays, run folders
    under `workdir`); print the table and write it, the JSON lines and one log per run to `out`
    (default `workdir`): at most 6 files."""
    out = out or workdir
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    start = time.perf_counter()
    train_json = make_data(workdir / "data", mode)
    runs = [
        run_strategy(mode, label, strategy, flags, train_json, workdir, results, out)
        for label, strategy, flags in mode.runs(strategies)
    ]
    total = time.perf_counter() - start
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    text = table(mode, records, runs) + f"\n\nWhole sweep: {total:.0f} s wall.\n"
    path = out / f"strategies_{mode.name}.md"
    path.write_text(text)
    print(
        f"\n{text}\nTable written to {path}; JSON lines in {results}; logs {out}/<strategy>.log", flush=True
    )  # noqa: T201
    return {"runs": runs, "records": records, "table": path, "total_s": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (ddp, fsdp2)")
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        help="gpu (strategies, the default), gpu-speed (baseline / packed / no checkpointing / compiled, "
        "under fsdp2), gpu-qlora (QLoRA at LLaVA-1.5-7B shapes on one device), or their CPU smokes smoke, "
        "smoke-speed and smoke-qlora (--smoke is smoke)",
    )
    parser.add_argument("--strategies", nargs="+", help="subset of the mode's strategies or variants")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gpu_checks"), help="table, results, logs")
    parser.add_argument("--workdir", help="data and run folders (default: OUT/work)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out / "work"
    mode = MODES[args.mode] if args.mode else SMOKE if args.smoke else GPU
    summary = run_all(mode, workdir, tuple(args.strategies or ()) or None, out)
    failed = [r["strategy"] for r in summary["runs"] if r["returncode"] != 0]
    sys.exit(f"failed: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
