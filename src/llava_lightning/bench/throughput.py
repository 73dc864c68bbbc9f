"""`StepThroughput`: a callback that times training steps and records tokens/s, TFLOP/s, MFU and peak memory."""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Callback

from .flops import LlavaFlops, batch_stats

# Dense (no sparsity) BF16 tensor-core peak of an H100 SXM5, per GPU: 989 TFLOP/s (NVIDIA H100
# datasheet; the 1979 figure is with 2:4 sparsity). An H200 has the same compute (989 dense).
# Set `peak_flops` on the callback to override.
H100_BF16_DENSE_FLOPS = 989e12
H100_PCIE_BF16_DENSE_FLOPS = 756e12  # H100 PCIe datasheet, dense bf16


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
