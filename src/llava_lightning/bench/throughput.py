"""`StepThroughput`: the training callback `LlavaThroughput` that also writes the GPU sweep's record of a run."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from lightning.pytorch.trainer.states import RunningStage

from ..training.throughput import LlavaThroughput


def _matmul_flops_per_s(device: torch.device, n: int = 1024, repeat: int = 5) -> float:
    """Measured fp32 matmul rate (the MFU denominator on a CPU, which has no datasheet figure here)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start)


class StepThroughput(LlavaThroughput):
    """`LlavaThroughput` over the steps after `warmup`, appending one JSON line with the run's figures
    to `results` at the end of training.

    The rolling window spans the last `max_steps - warmup` steps, so every rate is over exactly the
    timed steps (data, forward, backward, optimizer; a CUDA synchronize at each step end). Tokens are
    attention-mask tokens (text + image tokens, no padding); FLOPs come from `LlavaFlops` per batch;
    rank 0's batches stand for every rank's. The MFU peak is `peak_flops`, else the device's dense
    figure for the run's compute dtype (`LlavaThroughput`), else, on CPU, a measured fp32 matmul rate.
    Peak memory is `torch.cuda.max_memory_allocated` (and reserved) on CUDA, the process's peak RSS on CPU.
    """

    def __init__(self, results: str, label: str, warmup: int = 5, peak_flops: float | None = None):
        if warmup < 1:
            raise ValueError("warmup must be >= 1 (the first step holds allocation and kernel selection)")
        super().__init__(peak_flops=peak_flops, prog_bar=False)
        self.results, self.label, self.warmup = Path(results), label, warmup
        self._steps = 0
        self._totals = {"tokens": 0, "padded": 0, "flops": 0, "vision": 0, "projector": 0}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.max_steps < self.warmup + 2:
            raise ValueError(f"trainer.max_steps must be >= warmup + 2 = {self.warmup + 2}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "StepThroughput times one micro-batch per step: set accumulate_grad_batches to 1"
            )
        self.kwargs["window_size"] = trainer.max_steps - self.warmup + 1  # the warm-up's last step .. the end
        device = trainer.strategy.root_device
        measured = self.peak_flops is None and device.type != "cuda"
        if measured:
            self.peak_flops = _matmul_flops_per_s(device)
        super().setup(trainer, pl_module, stage)
        if measured:
            self.peak_source = "measured fp32 1024^3 matmul on this CPU"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._steps += 1
        if self._steps <= self.warmup or not trainer.is_global_zero or self.last_batch is None:
            return
        stats, flops = self.last_batch["stats"], self.last_batch["flops"] or {}
        for key, value in (
            ("tokens", sum(stats["seq_lens"])),
            ("padded", stats["padded"]),
            ("flops", flops.get("total", 0)),
            ("vision", flops.get("vision", 0)),
            ("projector", flops.get("projector", 0)),
        ):
            self._totals[key] += value * trainer.world_size

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
        m = self._throughputs[RunningStage.TRAINING].compute()
        timed = self._steps - self.warmup
        if timed < 2 or "device/items_per_sec" not in m:
            raise RuntimeError(
                f"{self.label}: {self._steps} steps, fewer than warmup {self.warmup} + 2 timed"
            )
        world = trainer.world_size
        extra = self.extra_metrics(trainer, RunningStage.TRAINING)
        record = {
            "strategy": self.label,
            "strategy_class": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "device": device_name,
            "world_size": world,
            "timed_steps": timed,
            "warmup_steps": self.warmup,
            "tokens_per_s": m["device/items_per_sec"] * world,
            "padded_tokens_per_s": extra["device/padded_items_per_sec"] * world,
            "samples_per_s": m["device/samples_per_sec"] * world,
            "tflops_per_s_per_device": m["device/flops_per_sec"] / 1e12,
            "mfu": m.get("device/mfu"),  # None: no peak known for the device
            "peak_flops": self.available_flops,
            "peak_source": self.peak_source,
            "step_time_s": 1 / m["device/batches_per_sec"],
            "peak_mem_gib": peak,
            "peak_reserved_gib": reserved,
            "peak_mem_kind": "torch.cuda.max_memory_allocated" if reserved is not None else "peak RSS",
            "tokens_per_step": self._totals["tokens"] / timed,
            "padding_fraction": 1 - self._totals["tokens"] / max(1, self._totals["padded"]),
            "flops_per_step": self._totals["flops"] / timed,
            "vision_projector_flops_share": (self._totals["vision"] + self._totals["projector"])
            / max(1, self._totals["flops"]),
            "params": self.flop_model.params if self.flop_model is not None else {},
            "torch": torch.__version__,
        }
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a") as f:
            f.write(json.dumps(record) + "\n")
