"""GPU checks: a ~1.4B random-init LLaVA trained 20 steps with each of fsdp2, fsdp,
deepspeed_zero2 and deepspeed_zero3 on one CUDA device, reporting tokens/s, peak memory and MFU.

    pytest -m gpu tests/gpu -s                      # on a CUDA machine (skipped without one)
    python -m llava_lightning.bench.gpu_sweep       # the same sweep as a script
    LLAVA_GPU_SMOKE=1 pytest -m gpu tests/gpu -s    # the same code path, tiny model on CPU

The table is printed and written to `strategies_<mode>.md` (path printed) beside `results.jsonl` and
one log per strategy, in `$LLAVA_GPU_OUT` if set, else the test's tmp_path. The FLOP count
behind MFU is analytic (see `llava_lightning.bench.flops`); `test_flop_count_matches_lightning_measure_flops` checks it
against Lightning's `measure_flops` on the tiny model, on CPU, in every run of the suite.
"""

import os
from pathlib import Path

import pytest
import torch

from llava_lightning.bench.flops import LlavaFlops, batch_stats
from llava_lightning.bench.gpu_sweep import GPU, SMOKE, run_all

SMOKE_REQUESTED = os.environ.get("LLAVA_GPU_SMOKE") == "1"


def _check(summary, mode, strategies=None):
    failed = {
        r["strategy"]: (r["returncode"], r.get("error"), r["log"])
        for r in summary["runs"]
        if r["returncode"] != 0
    }
    assert not failed, f"runs failed (exit code, last error line, log): {failed}"
    assert [r["strategy"] for r in summary["records"]] == list(strategies or mode.strategies)
    for r in summary["records"]:
        assert r["timed_steps"] == mode.steps - mode.warmup
        for key in ("tokens_per_s", "tflops_per_s_per_device", "mfu", "peak_mem_gib", "step_time_s"):
            assert r[key] > 0, (r["strategy"], key, r[key])
        assert 0 < r["vision_projector_flops_share"] < 1
    assert summary["table"].exists()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() and not SMOKE_REQUESTED,
    reason="needs a CUDA GPU (trains a ~1.4B LLaVA under fsdp2/fsdp/deepspeed); "
    "LLAVA_GPU_SMOKE=1 runs the same path with the tiny model on CPU",
)
def test_strategies_throughput_memory_mfu(tmp_path):
    mode = SMOKE if SMOKE_REQUESTED else GPU
    out = os.environ.get("LLAVA_GPU_OUT")  # where the table, JSON lines and logs go (default tmp_path)
    summary = run_all(mode, tmp_path, out=Path(out) if out else None)
    _check(summary, mode)
    if mode.budget_s is not None:
        assert summary["total_s"] < mode.budget_s, f"sweep took {summary['total_s']:.0f} s"


def test_cpu_smoke_of_the_gpu_sweep(tmp_path):
    """The GPU sweep's code path (CLI, overlay, callback, results, table) with the tiny model on CPU:
    fsdp2 only (~20 s); `LLAVA_GPU_SMOKE=1 pytest -m gpu tests/gpu` also runs ddp."""
    summary = run_all(SMOKE, tmp_path, strategies=("fsdp2",))
    _check(summary, SMOKE, ("fsdp2",))


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
    labels = torch.full_like(ids, -100)
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

    from llava_lightning.module import LlavaLitModule

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
    assert counted["total"] == measured
    assert counted["vision"] > 0 and counted["projector"] > 0
