"""Throughput, peak memory and MFU of LLaVA training under each sharding strategy (issue 5 §4).

One run per strategy: the real CLI (`python -m llava_lightning fit -c conf/stage2.yaml -c OVERLAY -c
conf/strategy/<s>.yaml`) trains stage 2 (projector + LLM, frozen tower, gradient checkpointing) on
synthetic-shapes data for a few steps, with the `StepThroughput` callback below recording every
step after a warm-up and appending one JSON line to a results file. `run_all` then prints a markdown
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

FLOP count (model FLOPs, the MFU convention: activation recomputation by gradient checkpointing is
not counted, padding tokens are not counted). Every matmul of the model is counted as 2 x MACs, like
`torch.utils.flop_counter` (what Lightning's `measure_flops` uses), for each sample's own length:

    forward   2 * (linear MACs + attention MACs), attention MACs per layer = 2 * T^2 * (heads * head_dim)
    backward  weight grads:  2 * linear MACs of every unit whose parameters train
              input grads:   2 * linear MACs + 2 * (2 * attention MACs) of every unit that some trained
                             parameter precedes, including the first trained block (its pre-norm weights
                             train); a first trained linear layer (the projector's first, under a frozen
                             tower) or patch embedding gets no input grad

applied, in order, to the vision patch embedding (per image, 576 patches), the vision blocks that run
(per image, 577 tokens with CLS), the projector's linears (per image token), the LLM decoder layers
(per sample, T = its attention-mask length) and the LM head (per supervised token only: training
runs the head on supervised positions). For stage 2 (frozen tower) that is, with N the linear
parameter counts:

    vision    2 * N_vision_blocks * 577 * images + 4 * 23 * 577^2 * 1024 * images   (forward only)
              + 2 * 3*14*14*1024 * 576 * images                                      (patch embedding)
    projector (2 * N_proj (fwd) + 2 * N_proj (weight grads) + 2 * N_proj2 (input grads)) * 576 * images,
              N_proj = 1024*2048 + 2048*2048, N_proj2 = 2048*2048 (its first layer's input needs no grad)
    LLM       6 * N_layers * sum(T) + 12 * 22 * 2048 * sum(T^2)
    head      6 * 2048 * 32000 * supervised tokens

Attention is counted over the full T x T square, as `flop_counter` counts SDPA (causal masking
halves the work a kernel really needs). `tests/gpu/test_strategies_gpu.py` checks this count
against Lightning's `measure_flops` on the tiny model (exact equality) for stages align, finetune,
full, and finetune with the last vision block unfrozen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback
from torch import nn

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Dense (no sparsity) BF16 tensor-core peak of an H100 SXM5, per GPU: 989 TFLOP/s (NVIDIA H100
# datasheet; the 1979 figure is with 2:4 sparsity). An H200 has the same compute (989 dense).
# Set `peak_flops` on the callback to override.
H100_BF16_DENSE_FLOPS = 989e12
H100_PCIE_BF16_DENSE_FLOPS = 756e12  # H100 PCIe datasheet, dense bf16

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


# ------------------------------------------------------------------------------------------ FLOPs
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


def batch_stats(batch: dict[str, Any]) -> dict[str, Any]:
    """Per-sample lengths (attention mask), images, supervised and padded token counts of a batch."""
    pixels = batch.get("pixel_values")
    return {
        "seq_lens": batch["attention_mask"].sum(1).tolist(),
        "n_images": 0 if pixels is None else int(pixels.shape[0]),
        "n_supervised": int((batch["labels"][:, 1:] != -100).sum()),
        "padded": int(batch["input_ids"].numel()),
        "samples": int(batch["input_ids"].shape[0]),
    }


# ------------------------------------------------------------------------------------------ callback
def _matmul_flops_per_s(device: torch.device, n: int = 1024, repeat: int = 5) -> float:
    """Measured fp32 matmul rate (the MFU denominator on a CPU, which has no datasheet figure here)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def _cuda_peak(device: torch.device) -> tuple[float, str]:
    """Dense bf16 peak of the card: the H100/H200 datasheet figure, else Lightning's table."""
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return H100_PCIE_BF16_DENSE_FLOPS, f"{name}: dense bf16 peak 756 TFLOP/s (H100 PCIe)"
    if "H100" in name or "H200" in name:
        return H100_BF16_DENSE_FLOPS, f"{name}: dense bf16 peak 989 TFLOP/s (H100/H200 SXM)"
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    return flops, f"{name}: Lightning's bf16 figure {flops / 1e12 if flops else 0:.0f} TFLOP/s"


class StepThroughput(Callback):
    """Times every training step after `warmup` and appends one JSON line with the run's figures to `results`.

    Steps are timed end to end (data, forward, backward, optimizer) between consecutive
    `on_train_batch_end` calls, after a CUDA synchronize. Tokens are attention-mask tokens (text +
    image tokens, no padding), summed over ranks; FLOPs come from `LlavaFlops` per batch; rates go
    through Lightning's `Throughput`. Peak memory is `torch.cuda.max_memory_allocated` (and
    reserved) on CUDA, the process's peak RSS on CPU.
    """

    def __init__(self, results: str, label: str, warmup: int = 5, peak_flops: float | None = None):
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the first step holds allocation and kernel selection)")
        self.results, self.label, self.warmup = Path(results), label, warmup
        self.peak_flops = peak_flops
        self.peak_source = "given" if peak_flops else None
        self._pending: dict[str, Any] | None = None
        self._steps = 0
        self._times: list[float] = []
        self._totals = {"samples": 0, "tokens": 0, "flops": 0, "padded": 0, "vision": 0, "projector": 0}
        self._throughput: Throughput | None = None
        self._t0 = self._last = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Runs before the strategy shards or partitions parameters, so shapes and counts are whole.
        model = pl_module.model
        self.flops = LlavaFlops.from_model(model)
        device = trainer.strategy.root_device
        if self.peak_flops is None:
            if device.type == "cuda":
                self.peak_flops, self.peak_source = _cuda_peak(device)
            else:
                self.peak_flops = _matmul_flops_per_s(device)
                self.peak_source = "measured fp32 1024^3 matmul on this CPU"
        if trainer.max_steps < self.warmup + 2:
            raise ValueError(f"trainer.max_steps must be >= warmup + 2 = {self.warmup + 2}")
        self._throughput = Throughput(
            available_flops=self.peak_flops,
            world_size=trainer.world_size,
            window_size=trainer.max_steps - self.warmup + 1,
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        stats = batch_stats(batch)
        flops = self.flops.batch_flops(stats["seq_lens"], stats["n_images"], stats["n_supervised"])
        self._pending = {
            "samples": stats["samples"],
            "tokens": sum(stats["seq_lens"]),
            "padded": stats["padded"],
            **{k: flops[k] for k in ("vision", "projector")},
            "flops": flops["total"],
        }

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        device = trainer.strategy.root_device
        self._sync(device)
        now = time.perf_counter()
        keys = list(self._pending)
        local = torch.tensor([self._pending[k] for k in keys], dtype=torch.float64, device=device)
        summed = trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1 else local
        step = dict(zip(keys, summed.tolist()))
        self._steps += 1
        if self._steps == self.warmup:
            self._t0 = now
            self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
        elif self._steps > self.warmup:
            self._times.append(now - self._last)
            for k in self._totals:
                self._totals[k] += int(step[k])
            n = trainer.world_size
            self._throughput.update(
                time=now - self._t0,
                batches=self._steps - self.warmup,
                samples=self._totals["samples"] // n,
                lengths=self._totals["tokens"] // n,
                flops=step["flops"] / n,
            )
        self._last = now

    def on_train_end(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            reserved = torch.cuda.max_memory_reserved(device) / 2**30
            device_name = torch.cuda.get_device_name(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
            reserved = None
            device_name = "cpu"
        if not trainer.is_global_zero:
            return
        if len(self._times) < 2:
            raise RuntimeError(
                f"{self.label}: {self._steps} steps, fewer than warmup {self.warmup} + 2 timed"
            )
        m = self._throughput.compute()
        world = trainer.world_size
        record = {
            "strategy": self.label,
            "strategy_class": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "device": device_name,
            "world_size": world,
            "timed_steps": len(self._times),
            "warmup_steps": self.warmup,
            "tokens_per_s": m["device/items_per_sec"] * world,
            "samples_per_s": m["device/samples_per_sec"] * world,
            "tflops_per_s_per_device": m["device/flops_per_sec"] / 1e12,
            "mfu": m["device/mfu"],
            "peak_flops": self.peak_flops,
            "peak_source": self.peak_source,
            "step_time_s": statistics.median(self._times),
            "peak_mem_gib": peak,
            "peak_reserved_gib": reserved,
            "peak_mem_kind": "torch.cuda.max_memory_allocated" if reserved is not None else "peak RSS",
            "tokens_per_step": self._totals["tokens"] / len(self._times),
            "padding_fraction": 1 - self._totals["tokens"] / max(1, self._totals["padded"]),
            "flops_per_step": self._totals["flops"] / len(self._times),
            "vision_projector_flops_share": (self._totals["vision"] + self._totals["projector"])
            / max(1, self._totals["flops"]),
            "params": self.flops.params,
            "torch": torch.__version__,
        }
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a") as f:
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------ runs
@dataclass
class Mode:
    """What one sweep over the strategies trains, and where."""

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
    budget_s=480,  # issue 5 §4: the four runs in under 8 minutes on one H100
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


def make_data(out: Path, mode: Mode) -> Path:
    """Synthetic-shapes instruction data with enough samples for one epoch of `mode.steps` batches."""
    from llava_lightning.data.synthetic import generate

    n = (mode.steps + 2) * mode.batch_size
    if not (out / "instruct" / "llava_instruct.json").exists():
        generate(out, seed=0, n_captions=4, n_instruct=n, n_eval=4, shard_size=4, n_mc_train=4, n_val=4)
    return out


def overlay(mode: Mode, strategy: str, data: Path, workdir: Path, results: Path) -> Path:
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
            "default_root_dir": str(workdir / strategy),
            "callbacks": [
                {
                    "class_path": "gpu_bench.StepThroughput",
                    "init_args": {"results": str(results), "label": strategy, "warmup": mode.warmup},
                }
            ],
        },
        "model": {
            **mode.model,
            "stage": "finetune",
            "gradient_checkpointing": True,
            "init_projector": None,
        },
        "data": {
            "train": [
                {
                    "kind": "instruct",
                    "path": str(data / "instruct" / "llava_instruct.json"),
                    "image_root": str(data / "instruct"),
                }
            ],
            "val": None,
            "batch_size": mode.batch_size,
            "num_workers": mode.num_workers,
        },
    }
    path = workdir / f"overlay-{strategy}.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_strategy(
    mode: Mode, strategy: str, data: Path, workdir: Path, results: Path, logs: Path
) -> dict[str, Any]:
    """One `fit` subprocess; returns {strategy, returncode, wall_s, log} (+ error: its last error line)."""
    strategy_yaml = REPO / "conf" / "strategy" / f"{strategy}.yaml"
    log = logs / f"{strategy}.log"
    if not strategy_yaml.exists():
        log.write_text(f"{strategy_yaml} does not exist\n")
        return {
            "strategy": strategy,
            "returncode": None,
            "wall_s": 0.0,
            "log": str(log),
            "error": "no such YAML",
        }
    cmd = [
        sys.executable, "-m", "llava_lightning", "fit",
        "-c", str(REPO / "conf" / "stage2.yaml"),
        "-c", str(overlay(mode, strategy, data, workdir, results)),
        "-c", str(strategy_yaml),
        *mode.extra_flags,
        *mode.strategy_flags.get(strategy, ()),
    ]  # fmt: skip
    env = {
        **os.environ,
        # The callback's module, and the package from this checkout (also where it is not installed).
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
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
    run = {"strategy": strategy, "returncode": rc, "wall_s": time.perf_counter() - start, "log": str(log)}
    if rc != 0:
        errors = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x or "Exception" in x]
        run["error"] = errors[-1].strip()[:300] if errors else ""
    return run


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
        f"(projector + LLM train), gradient checkpointing; params vision {params.get('vision', 0) / 1e6:.0f}M, "
        f"projector {params.get('projector', 0) / 1e6:.1f}M, LLM {params.get('llm', 0) / 1e6:.0f}M "
        f"(trainable {params.get('trainable', 0) / 1e6:.0f}M); MFU vs {first.get('peak_source', '?')}.",
        "",
        f"| strategy | precision | tokens/s | step time (s) | TFLOP/s | MFU % | {mem} (GiB) | reserved (GiB) "
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
        lines.append(
            f"| {r['strategy']} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['step_time_s']:.3f} "
            f"| {r['tflops_per_s_per_device']:.2f} | {100 * r['mfu']:.1f} | {r['peak_mem_gib']:.2f} "
            f"| {_fmt(r['peak_reserved_gib'], '.2f')} | {100 * r['vision_projector_flops_share']:.1f}% "
            f"| {run['wall_s']:.0f} |"
        )
    flags = [
        f"{s}: `{' '.join(f)}`" for s, f in mode.strategy_flags.items() if s in {r["strategy"] for r in runs}
    ]
    if mode.extra_flags or flags:
        lines += [
            "",
            f"Flags after the strategy YAML: all: `{' '.join(mode.extra_flags) or '-'}`; " + "; ".join(flags),
        ]
    return "\n".join(lines)


def run_all(
    mode: Mode, workdir: Path, strategies: tuple[str, ...] | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Run every strategy of `mode` (data, overlays, run folders under `workdir`); print the table and
    write it, the JSON lines and one log per strategy to `out` (default `workdir`): at most 6 files."""
    out = out or workdir
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    start = time.perf_counter()
    data = make_data(workdir / "data", mode)
    runs = [run_strategy(mode, s, data, workdir, results, out) for s in strategies or mode.strategies]
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
    parser.add_argument("--strategies", nargs="+", help="subset of the mode's strategies")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gpu_checks"), help="table, results, logs")
    parser.add_argument("--workdir", help="data and run folders (default: OUT/work)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out / "work"
    summary = run_all(SMOKE if args.smoke else GPU, workdir, tuple(args.strategies or ()) or None, out)
    failed = [r["strategy"] for r in summary["runs"] if r["returncode"] != 0]
    sys.exit(f"failed: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
