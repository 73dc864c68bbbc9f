"""Throughput and MFU in every run: the analytic FLOP model (`training/flops.py`) against Lightning's
`measure_flops`, batch counting for padded and packed rows, and `LlavaThroughput`'s logged figures
against the batches' own token counts and step times, under a controlled clock and a real one."""

import os
import time
import types

import lightning as L
import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import throughput_monitor as lightning_throughput_monitor
from lightning.pytorch.loggers.logger import Logger

from llava_lightning.batch import IGNORE_INDEX
from llava_lightning.module import LlavaLitModule
from llava_lightning.training.flops import LlavaFlops, batch_stats
from llava_lightning.training.throughput import LlavaThroughput, compute_dtype, device_peak_flops

# ------------------------------------------------------------------------------------ the FLOP model


def _batch(model, lengths_images, supervised=4, seed=0):
    """Equal-length samples (no padding, so `measure_flops` sees exactly the counted tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = model.vision_tower.num_tokens
    rows, images = [], 0
    for length, n_img in lengths_images:
        ids = torch.randint(3, 900, (length,), generator=g)
        for i in range(n_img):
            ids[2 + i * (n + 1) : 2 + i * (n + 1) + n] = model.image_token_id
        rows.append(ids)
        images += n_img
    ids = torch.stack(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -supervised:] = ids[:, -supervised:]
    size = model.vision_tower.image_size
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8) if images else None
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": pixels,
    }


@pytest.mark.parametrize(
    "stage, unfreeze",
    [("finetune", 0), ("align", 0), ("full", 0), ("finetune", 1)],
)
def test_flop_count_matches_lightning_measure_flops(stage, unfreeze):
    from lightning.fabric.utilities.throughput import measure_flops

    model = LlavaLitModule(preset="tiny", stage=stage, unfreeze_vision_blocks=unfreeze).model.train()
    # flop_counter has no formula for the CPU SDPA kernel; eager attention runs the same products as bmm.
    model.vision_tower.hf_model.set_attn_implementation("eager")
    model.language_model.set_attn_implementation("eager")
    n = model.vision_tower.num_tokens
    batch = _batch(model, [(2 * n + 8, 2), (2 * n + 8, 0)])  # two images; text only
    measured = measure_flops(
        model,
        lambda: model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            return_logits=False,
        ),
        lambda out: out.loss_sum,
    )
    s = batch_stats(batch)
    counted = LlavaFlops.from_model(model).batch_flops(s["seq_lens"], s["n_images"], s["n_supervised"])
    assert counted["total"] == measured  # exact: both count 2 FLOPs per multiply-accumulate
    assert counted["vision"] > 0 and counted["projector"] > 0


def test_batch_stats_count_padded_rows_and_each_sample_of_a_packed_row():
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 3:5] = 7  # 2 scored positions (position 0 is never scored: nothing predicts it)
    labels[1, 0:3] = 7
    padded = {
        "input_ids": torch.ones(2, 8, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 5 + [0] * 3, [1] * 8]),
        "labels": labels,
        "pixel_values": torch.zeros(3, 3, 4, 4),
    }
    assert batch_stats(padded) == {
        "seq_lens": [5, 8],
        "n_images": 3,
        "n_supervised": 4,
        "padded": 16,
        "samples": 2,
    }
    # Row 0 packs samples of 3, 2 and 2 tokens, then 1 padding position; row 1 one sample of 5, then 3
    # of padding whose position ids restart at 0 (they count for nothing).
    packed = {
        **padded,
        "attention_mask": torch.tensor([[1] * 7 + [0], [1] * 5 + [0] * 3]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 0], [0, 1, 2, 3, 4, 0, 1, 2]]),
    }
    stats = batch_stats(packed)
    assert stats["seq_lens"] == [3, 2, 2, 5] and stats["samples"] == 4 and stats["padded"] == 16
    empty = {"input_ids": torch.zeros(0, 0, dtype=torch.long), "attention_mask": torch.zeros(0, 0)}
    assert batch_stats({**empty, "labels": empty["input_ids"], "pixel_values": None})["samples"] == 0


def test_a_packed_row_counts_the_flops_of_its_samples_not_of_the_row():
    model = LlavaLitModule(preset="tiny", stage="finetune").model
    flops = LlavaFlops.from_model(model)
    as_rows = flops.batch_flops([30, 20], n_images=0, n_supervised=10)
    as_one = flops.batch_flops([50], n_images=0, n_supervised=10)
    # Same linear work; attention over 30^2 + 20^2 positions instead of 50^2.
    assert as_rows["total"] < as_one["total"]
    packed = {
        "input_ids": torch.ones(1, 50, dtype=torch.long),
        "attention_mask": torch.ones(1, 50, dtype=torch.long),
        "position_ids": torch.cat([torch.arange(30), torch.arange(20)])[None],
        "labels": torch.full((1, 50), IGNORE_INDEX),
        "pixel_values": None,
    }
    s = batch_stats(packed)
    assert flops.batch_flops(s["seq_lens"], s["n_images"], 10) == as_rows


# ------------------------------------------------------------------------------------ the callback


class _Recorder(Logger):
    """Keeps every `log_metrics` call."""

    def __init__(self, save_dir=None):
        super().__init__()
        self.records: list[tuple[int, dict]] = []
        self._save_dir = save_dir

    @property
    def save_dir(self):
        return self._save_dir

    name, version = "recorder", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def last(self, key):
        return [m[key] for _, m in self.records if key in m][-1]


def _tiny_batch(model, lengths, n_images, extra_pad, supervised=3):
    """A LlavaBatch right-padded to `extra_pad` past its longest row: one row per length, the first
    `n_images` rows holding one image each."""
    n = model.vision_tower.num_tokens
    pad_to = max(lengths) + extra_pad
    ids = torch.zeros(len(lengths), pad_to, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(3, 900, (length,))
        if i < n_images:
            ids[i, 2 : 2 + n] = model.image_token_id
        mask[i, :length] = 1
        labels[i, length - supervised : length] = ids[i, length - supervised : length]
    size = model.vision_tower.image_size
    pixels = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8) if n_images else None
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _batches(model):
    n = model.vision_tower.num_tokens
    empty = {
        "input_ids": torch.zeros(0, 0, dtype=torch.long),
        "attention_mask": torch.zeros(0, 0, dtype=torch.long),
        "labels": torch.zeros(0, 0, dtype=torch.long),
        "pixel_values": None,
    }
    return [
        _tiny_batch(model, [n + 20, n + 9], 2, 4),
        _tiny_batch(model, [n + 12, 30], 1, 0),
        _tiny_batch(model, [40, 25, 18], 0, 8),
        empty,  # every sample skipped: not counted, its time goes to the next micro-batch
        _tiny_batch(model, [n + 5, n + 30, 17], 2, 10),
        _tiny_batch(model, [22], 0, 0),
    ]


class _Clock(Callback):
    """Advances a fake `perf_counter` by `durations[k]` at the start of micro-batch k."""

    def __init__(self, durations):
        self.durations, self.now = durations, 0.0

    def perf_counter(self):
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.now += self.durations[batch_idx]


@pytest.mark.parametrize("peak", [None, 3.0e12])
def test_logged_rates_follow_the_batches_tokens_flops_and_step_times(tmp_path, monkeypatch, peak):
    """Under a controlled clock every figure has an exact reference: the batches' own token counts,
    FLOPs from `LlavaFlops` with the lengths the batches were built with, and the clock's step times."""
    torch.manual_seed(0)
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    batches = _batches(lit.model)
    durations = [0.7, 0.5, 0.25, 0.1, 0.4, 0.3]
    clock = _Clock(durations)
    monkeypatch.setattr(
        lightning_throughput_monitor, "time", types.SimpleNamespace(perf_counter=clock.perf_counter)
    )
    logger = _Recorder()
    monitor = LlavaThroughput(window_size=3, peak_flops=peak)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[clock, monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(lit, train_dataloaders=loader)

    # References, from how the batches were built (not from batch_stats).
    real = [int(b["attention_mask"].sum()) for b in batches]
    padded = [b["input_ids"].numel() for b in batches]
    samples = [b["input_ids"].shape[0] for b in batches]
    flops = LlavaFlops.from_model(lit.model)
    fl = [
        0
        if not s
        else flops.batch_flops(
            b["attention_mask"].sum(1).tolist(),
            0 if b["pixel_values"] is None else len(b["pixel_values"]),
            int((b["labels"][:, 1:] != IGNORE_INDEX).sum()),
        )["total"]
        for b, s in zip(batches, samples)
    ]
    ends = [sum(durations[: k + 1]) for k in range(len(durations))]
    # The window holds the last 3 counted micro-batches (#2, #4, #5, 0-based; #3 was empty): rates over
    # the interval from #2's end to #5's, of what #4 and #5 brought.
    dt = ends[5] - ends[2]
    rel = 1e-9  # float64 arithmetic on both sides
    assert logger.last("train/device/items_per_sec") == pytest.approx((real[4] + real[5]) / dt, rel=rel)
    assert logger.last("train/device/padded_items_per_sec") == pytest.approx(
        (padded[4] + padded[5]) / dt, rel=rel
    )
    assert logger.last("train/device/samples_per_sec") == pytest.approx(
        (samples[4] + samples[5]) / dt, rel=rel
    )
    # 2 micro-batches per optimizer step, 2 counted in the window's time: seconds per step = 2 * dt / 2.
    assert logger.last("train/step_time") == pytest.approx(2 * dt / 2, rel=rel)
    assert logger.last("train/device/flops_per_sec") == pytest.approx((fl[4] + fl[5]) / dt, rel=rel)
    assert logger.last("train/lengths") == sum(real) and logger.last("train/padded_lengths") == sum(padded)
    assert logger.last("train/samples") == sum(samples)
    assert logger.last("train/device/padded_items_per_sec") > logger.last("train/device/items_per_sec")
    logged = {k for _, m in logger.records for k in m}
    assert not any("peak_memory" in k for k in logged)  # CPU: no device memory figure
    bar = trainer.progress_bar_metrics
    assert bar["tok/s"] == pytest.approx(logger.last("train/device/items_per_sec"), rel=1e-6)  # float32
    assert bar["pad_tok/s"] == pytest.approx(logger.last("train/device/padded_items_per_sec"), rel=1e-6)
    assert bar["step_s"] == pytest.approx(dt, rel=1e-6)
    assert bar["TFLOP/s"] == pytest.approx((fl[4] + fl[5]) / dt / 1e12, rel=1e-6)
    if peak is None:  # no peak known for a CPU: FLOP/s without MFU
        assert "train/device/mfu" not in logged and "mfu" not in bar
    else:
        assert logger.last("train/device/mfu") == pytest.approx((fl[4] + fl[5]) / dt / peak, rel=rel)
        assert bar["mfu"] == pytest.approx((fl[4] + fl[5]) / dt / peak, rel=1e-6)


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="window_size must be >= 2"):
        LlavaThroughput(window_size=1)
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        LlavaThroughput(peak_flops=0)


def test_no_peak_is_known_for_a_cpu():
    flops, source = device_peak_flops(torch.device("cpu"), torch.float32)
    assert flops is None and "peak_flops" in source


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        # Dense datasheet figures (TFLOP/s): H200 SXM = H100 SXM compute; H200 NVL 1671 / 2 with sparsity.
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA H200 NVL", torch.bfloat16, 835.5e12),
        ("NVIDIA H200", torch.float16, 989.4e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # Lightning's table ("h100 sxm")
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ],
)
def test_dense_peaks_of_hopper_cards(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0), dtype)[0] == pytest.approx(peak, rel=1e-6)


def test_h200_fp32_matmuls_count_against_tf32_unless_precision_is_highest(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert device_peak_flops(torch.device("cuda", 0), torch.float32)[0] == 494.7e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert device_peak_flops(torch.device("cuda", 0), torch.float32)[0] == 66.9e12


def test_compute_dtype_follows_precision_then_the_fsdp2_cast_then_the_flag():
    from llava_lightning.training.fsdp2 import FSDP2Strategy

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, **kw)

    assert compute_dtype(trainer(precision="bf16-mixed")) == torch.bfloat16
    assert compute_dtype(trainer(precision="32-true")) == torch.float32
    # conf/strategy/fsdp2.yaml: 32-true master weights, bf16 compute through the strategy's policy.
    assert compute_dtype(trainer(precision="32-true", strategy=FSDP2Strategy())) == torch.bfloat16
    assert (
        compute_dtype(trainer(precision="32-true", strategy=FSDP2Strategy(param_dtype=None))) == torch.float32
    )
    assert compute_dtype(trainer(precision="bf16-mixed"), "float16") == torch.float16


class _WallClock(Callback):
    """perf_counter at each micro-batch end, just after LlavaThroughput's own reading."""

    def __init__(self):
        self.ends, self.tokens = [], []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append(time.perf_counter())
        self.tokens.append(int(batch["attention_mask"].sum()))


def test_the_shipped_tiny_config_logs_throughput_in_a_real_fit(shapes_dir, tmp_path, monkeypatch):
    """stage2.yaml + tiny.yaml through the CLI: the callback is there, and its tokens/s is the real
    tokens of the window's batches over the wall time they took (within 5%: the two clocks are read a
    few microseconds apart at each step end)."""
    from llava_lightning.cli import LlavaCLI
    from llava_lightning.data import LlavaDataModule

    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)  # tiny.yaml names data/shapes relative to the working directory
    conf = REPO / "conf"
    cli = LlavaCLI(
        LlavaLitModule,
        LlavaDataModule,
        args=[
            "-c",
            str(conf / "stage2.yaml"),
            "-c",
            str(conf / "tiny.yaml"),
            "--trainer.max_steps=5",
            "--trainer.limit_val_batches=0",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--data.num_workers=0",
            "--data.batch_size=4",
            "--trainer.logger=false",
        ],  # fmt: skip
        run=False,
    )
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, LlavaThroughput)]
    assert type(monitor) is LlavaThroughput
    monitor.kwargs["window_size"] = 3  # the shipped 20 needs 20 steps before the first rate
    logger, wall = _Recorder(str(tmp_path)), _WallClock()
    cli.trainer.callbacks.append(wall)
    cli.trainer.loggers = [logger]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(wall.ends) == 5
    expected = (wall.tokens[3] + wall.tokens[4]) / (wall.ends[4] - wall.ends[2])
    assert logger.last("train/device/items_per_sec") == pytest.approx(expected, rel=0.05)
    assert logger.last("train/step_time") == pytest.approx((wall.ends[4] - wall.ends[2]) / 2, rel=0.05)
    assert logger.last("train/device/padded_items_per_sec") >= logger.last("train/device/items_per_sec")
    assert logger.last("train/device/flops_per_sec") > 0
