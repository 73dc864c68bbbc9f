"""`LlavaThroughput`: Lightning's `ThroughputMonitor` set up for LLaVA batches, with model FLOPs and MFU.

Logged under the stage's prefix (`train/`, `validate/`, `test/`) to the loggers every
`log_every_n_steps`, rates as rolling means over the last `window_size` micro-batches of rank 0,
scaled by the world size for the global (no `device/`) keys, which only exist for world size > 1:

    device/items_per_sec          real tokens/s (attention-mask tokens: text + image, no padding)
    device/padded_items_per_sec   padded tokens/s (every position of `input_ids`)
    device/samples_per_sec        samples/s (the samples of packed rows, not the rows)
    device/batches_per_sec        micro-batches/s
    step_time                     seconds per optimizer step (per batch outside training)
    device/flops_per_sec          model FLOP/s (`training/flops.py`; training only)
    device/mfu                    flops_per_sec / the device's peak (when the peak is known or given)
    device/peak_memory_{allocated,reserved}_gib   torch.cuda.max_memory_* since the start (CUDA only)
    time, batches, samples, lengths, padded_lengths   totals since the stage started

and, in training, to the progress bar as `tok/s`, `pad_tok/s`, `samples/s`, `step_s`, `TFLOP/s`,
`mfu` and `mem_GiB` (global rates, per-device FLOP/s). Predict is not measured.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .flops import LlavaFlops, batch_stats

ComputeDType = Literal["bfloat16", "float16", "float32"]

# Dense (no 2:4 sparsity) peaks of one H200, per dtype ("tfloat32": fp32 matmuls on tensor cores). An
# H200 SXM computes like an H100 SXM; an H200 NVL runs at 835 dense bf16. Lightning's table holds the
# H200 datasheet's with-sparsity figures (twice these) under names a real device name never matches.
H200_DENSE_PEAK_FLOPS: dict[str, dict[torch.dtype | str, float]] = {
    "h200 nvl": {
        torch.bfloat16: 835.5e12,
        torch.float16: 835.5e12,
        "tfloat32": 417.5e12,
        torch.float32: 60e12,
    },
    "h200": {
        torch.bfloat16: 989.4e12,
        torch.float16: 989.4e12,
        "tfloat32": 494.7e12,
        torch.float32: 66.9e12,
    },
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Dense peak FLOP/s of one `device` computing in `dtype`, and where the figure comes from.

    H200: `H200_DENSE_PEAK_FLOPS`; any other device: Lightning's `get_available_flops` (which warns
    and gives None for a card it does not know, and gives None on CPU).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "h200" in name.lower():
            table = H200_DENSE_PEAK_FLOPS["h200 nvl" if "nvl" in name.lower() else "h200"]
            # As Lightning: fp32 matmuls run on tensor cores (TF32) unless the precision is "highest".
            key = (
                "tfloat32"
                if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
                else dtype
            )
            if key in table:
                return table[key], f"{name}: dense {key} peak {table[key] / 1e12:.0f} TFLOP/s"
    flops = get_available_flops(device, dtype)
    if flops is None:
        return None, f"no known peak for {device} in {dtype} (give peak_flops)"
    return float(flops), f"Lightning's {dtype} figure for {device}: {flops / 1e12:.0f} TFLOP/s"


def compute_dtype(trainer, given: ComputeDType | None = None) -> torch.dtype:
    """The dtype a run's matmuls use: `given`, else the strategy's `param_dtype` where it has one (FSDP2
    casts for compute itself and runs under 32-true), else what the trainer's precision plugin computes in."""
    if given is not None:
        return getattr(torch, given)
    param_dtype = getattr(trainer.strategy, "param_dtype", None)
    if isinstance(param_dtype, str):
        param_dtype = getattr(torch, param_dtype, None)
    if isinstance(param_dtype, torch.dtype):
        return param_dtype
    return _plugin_to_compute_dtype(trainer.precision_plugin)


class LlavaThroughput(ThroughputMonitor):
    """Tokens/s (real and padded), samples/s, step time, model FLOP/s, MFU and peak memory of a run.

    Lightning's `ThroughputMonitor` does the timing (a CUDA synchronize at each micro-batch end, on
    rank 0), the rolling windows and the logging; this subclass counts LLaVA batches (`batch_stats`),
    puts each training micro-batch's analytic FLOPs in `pl_module.flops_per_batch` (where
    `ThroughputMonitor` reads them), picks the peak for MFU, and adds padded tokens/s, step time,
    peak memory and the progress bar. Rank 0's batches stand for every rank's (as in
    `ThroughputMonitor`). A micro-batch whose samples were all skipped is not counted; its time goes
    to the next one.
    """

    def __init__(
        self,
        window_size: int = 20,
        peak_flops: float | None = None,
        compute_dtype: ComputeDType | None = None,
        prog_bar: bool = True,
    ):
        """
        Args:
            window_size: Micro-batches the rates are averaged over; rates appear once this many have run.
            peak_flops: Peak FLOP/s of one device for MFU (None: the device's dense figure for the compute
                dtype, from `H200_DENSE_PEAK_FLOPS` or Lightning's table; none known on CPU: no MFU).
            compute_dtype: Dtype the matmuls run in, for the peak (None: the strategy's `param_dtype`
                where it has one, as FSDP2Strategy, else the trainer's precision).
            prog_bar: Also show tokens/s, samples/s, step time, FLOP/s, MFU and peak memory in the progress bar.
        """
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2 (a rate needs two timestamps), got {window_size}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 (FLOP/s of one device), got {peak_flops}")
        super().__init__(
            batch_size_fn=self._count_samples, length_fn=self._count_tokens, window_size=window_size
        )
        self.peak_flops, self.compute_dtype, self.prog_bar = peak_flops, compute_dtype, prog_bar
        self.peak_source: str | None = None
        self.flop_model: LlavaFlops | None = None
        self.last_batch: dict[str, Any] | None = None
        """The latest counted micro-batch's `batch_stats` and, in training, `flops` (by component)."""
        self._padded: dict[RunningStage, Throughput] = {}
        self._padded_lengths: dict[RunningStage, int] = {}

    # ------------------------------------------------------------------------------------ setup
    def setup(self, trainer, pl_module, stage: str) -> None:
        # ThroughputMonitor looks the peak up by the precision plugin's dtype (and warns): replaced below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops, self.peak_source = self.peak_flops, "given"
        else:
            self.available_flops, self.peak_source = device_peak_flops(
                trainer.strategy.root_device, compute_dtype(trainer, self.compute_dtype)
            )
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops
        self._padded = {
            s: Throughput(world_size=trainer.world_size, **self.kwargs) for s in self._throughputs
        }
        if stage == "fit":
            # Before the strategy shards or partitions the model (setup runs first): whole shapes.
            self.flop_model = None
            try:
                self.flop_model = LlavaFlops.from_model(pl_module.model)
            except (AttributeError, NotImplementedError, StopIteration) as err:
                rank_zero_warn(
                    f"LlavaThroughput: no FLOP count for this model ({err}); tokens/s and samples/s are "
                    "logged, FLOP/s and MFU are not"
                )
        pl_module.flops_per_batch = None  # ThroughputMonitor's FLOP source, set per training micro-batch

    # ------------------------------------------------------------------------------------ counting
    def _count_samples(self, batch: Any) -> int:
        return self.last_batch["stats"]["samples"]

    def _count_tokens(self, batch: Any) -> int:
        return sum(self.last_batch["stats"]["seq_lens"])

    def _start(self, trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        if self._samples[stage] == 0:  # ThroughputMonitor reset this stage's counts
            self._padded[stage].reset()
            self._padded_lengths[stage] = 0

    def _update(self, trainer, pl_module, batch: Any, iter_num: int) -> None:
        stats = batch_stats(batch)
        if stats["samples"] == 0:
            self.last_batch = None
            return
        stage = trainer.state.stage
        flops = None
        if stage == RunningStage.TRAINING and self.flop_model is not None:
            flops = self.flop_model.batch_flops(stats["seq_lens"], stats["n_images"], stats["n_supervised"])
        self.last_batch = {"stats": stats, "flops": flops}
        pl_module.flops_per_batch = None if flops is None else flops["total"]
        super()._update(trainer, pl_module, batch, iter_num)
        counted = self._throughputs[stage].compute()
        self._padded_lengths[stage] += stats["padded"]
        self._padded[stage].update(
            time=counted["time"],
            batches=counted["batches"],
            samples=counted["samples"],
            lengths=self._padded_lengths[stage],
        )

    # ------------------------------------------------------------------------------------ reporting
    def extra_metrics(self, trainer, stage: RunningStage) -> dict[str, float]:
        """What this callback adds to `ThroughputMonitor`'s metrics for `stage` (keys without the prefix)."""
        sep = self._padded[stage].separator
        counted = self._throughputs[stage].compute()
        padded = self._padded[stage].compute()
        out: dict[str, float] = {"padded_lengths": padded["lengths"]}
        if f"device{sep}items_per_sec" in padded:
            out[f"device{sep}padded_items_per_sec"] = padded[f"device{sep}items_per_sec"]
            if trainer.world_size > 1:
                out["padded_items_per_sec"] = padded["items_per_sec"]
        if f"device{sep}batches_per_sec" in counted:
            per_step = trainer.accumulate_grad_batches if stage == RunningStage.TRAINING else 1
            out["step_time"] = per_step / counted[f"device{sep}batches_per_sec"]
        device = trainer.strategy.root_device
        if device.type == "cuda":
            out[f"device{sep}peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            out[f"device{sep}peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        return out

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        stage = trainer.state.stage
        if not self._samples.get(stage):
            return  # nothing counted yet (the stage's first micro-batches were all skipped)
        super()._compute(trainer, iter_num)
        # At the loggers' cadence, as ThroughputMonitor logs: each `module.log` call costs milliseconds.
        if not trainer._logger_connector.should_update_logs:
            return
        extra = self.extra_metrics(trainer, stage)
        sep = self._padded[stage].separator
        trainer._logger_connector.log_metrics(
            {f"{stage.value}{sep}{k}": v for k, v in extra.items()}, step=iter_num
        )
        if self.prog_bar and stage == RunningStage.TRAINING:
            self._to_progress_bar(trainer, {**self._throughputs[stage].compute(), **extra})

    def _to_progress_bar(self, trainer, metrics: dict[str, float]) -> None:
        sep, world = self._padded[RunningStage.TRAINING].separator, trainer.world_size
        shown = {
            "tok/s": (f"device{sep}items_per_sec", world),
            "pad_tok/s": (f"device{sep}padded_items_per_sec", world),
            "samples/s": (f"device{sep}samples_per_sec", world),
            "step_s": ("step_time", 1),
            "TFLOP/s": (f"device{sep}flops_per_sec", 1e-12),
            "mfu": (f"device{sep}mfu", 1),
            "mem_GiB": (f"device{sep}peak_memory_allocated_gib", 1),
        }
        module = trainer.lightning_module
        for name, (key, scale) in shown.items():
            if key in metrics:
                module.log(
                    name,
                    float(metrics[key] * scale),
                    prog_bar=True,
                    logger=False,
                    on_step=True,
                    on_epoch=False,
                    rank_zero_only=True,
                    batch_size=1,
                )

    # Generation throughput is not what this measures (predict batches carry prompts, not token ids).
    def on_predict_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass
