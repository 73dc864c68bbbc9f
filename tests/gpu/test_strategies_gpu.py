"""GPU checks: a ~1.4B random-init LLaVA trained 20 steps on one CUDA device, reporting tokens/s,
peak memory and MFU, as two sweeps of about 8 minutes each: the speed ladder under fsdp2 (baseline,
packed, varlen kernel, no checkpointing, compiled; `LLAVA_GPU_SWEEP=speed`, the default) or the
strategies fsdp2, fsdp, deepspeed_zero2 and deepspeed_zero3 (`LLAVA_GPU_SWEEP=strategies`); or QLoRA stage
2 at LLaVA-1.5-7B shapes on one device, whose peak reserved memory must fit a 24 GB card
(`LLAVA_GPU_SWEEP=qlora`, about 5 minutes).

    pytest -m gpu tests/gpu -s                                   # on a CUDA machine (skipped without one)
    python -m llava_lightning.bench.gpu_sweep --mode gpu-speed   # the same ladder as a script (--mode gpu: strategies)
    LLAVA_GPU_SMOKE=1 pytest -m gpu tests/gpu -s                 # the same code path, tiny model on CPU

The table is printed and written to `strategies_<mode>.md` (path printed) beside `results.jsonl` and
one log per strategy, in `$LLAVA_GPU_OUT` if set, else the test's tmp_path. The FLOP count
behind MFU is analytic (`llava_lightning.training.flops`); `tests/test_throughput.py` checks it
against Lightning's `measure_flops` on the tiny model, on CPU, in every run of the suite.
"""

import os
from pathlib import Path

import pytest
import torch

from llava_lightning.bench.gpu_sweep import (
    GPU,
    GPU_QLORA,
    GPU_SPEED,
    QLORA_MEMORY_GIB,
    SMOKE,
    SMOKE_QLORA,
    SMOKE_SPEED,
    run_all,
)
from llava_lightning.training.quantization import kernel_problem

SMOKE_REQUESTED = os.environ.get("LLAVA_GPU_SMOKE") == "1"
SWEEP = os.environ.get("LLAVA_GPU_SWEEP", "speed")


def _check(summary, mode, strategies=None):
    failed = {
        r["strategy"]: (r["returncode"], r.get("error"), r["log"])
        for r in summary["runs"]
        if r["returncode"] != 0
    }
    assert not failed, f"runs failed (exit code, last error line, log): {failed}"
    assert [r["strategy"] for r in summary["records"]] == [label for label, _, _ in mode.runs(strategies)]
    for r in summary["records"]:
        assert r["timed_steps"] == mode.steps - mode.warmup
        for key in ("tokens_per_s", "tflops_per_s_per_device", "mfu", "peak_mem_gib", "step_time_s"):
            assert r[key] is not None and r[key] > 0, (r["strategy"], key, r[key])
        assert r["padded_tokens_per_s"] >= r["tokens_per_s"]
        assert 0 < r["vision_projector_flops_share"] < 1
    assert summary["table"].exists()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() and not SMOKE_REQUESTED,
    reason="needs a CUDA GPU (trains a ~1.4B LLaVA under fsdp2/fsdp/deepspeed); "
    "LLAVA_GPU_SMOKE=1 runs the same path with the tiny model on CPU",
)
def test_throughput_memory_mfu(tmp_path):
    if SWEEP not in ("speed", "strategies", "qlora"):
        pytest.fail(f"LLAVA_GPU_SWEEP must be speed, strategies or qlora, got {SWEEP!r}")
    modes = {
        "speed": (SMOKE_SPEED, GPU_SPEED),
        "strategies": (SMOKE, GPU),
        "qlora": (SMOKE_QLORA, GPU_QLORA),
    }[SWEEP]
    mode = modes[0] if SMOKE_REQUESTED else modes[1]
    out = os.environ.get("LLAVA_GPU_OUT")  # where the table, JSON lines and logs go (default tmp_path)
    summary = run_all(mode, tmp_path, out=Path(out) if out else None)
    _check(summary, mode)
    if mode.budget_s is not None:
        assert summary["total_s"] < mode.budget_s, f"sweep took {summary['total_s']:.0f} s"
    if mode is GPU_QLORA:
        (record,) = summary["records"]
        print(
            f"QLoRA 7B peak memory: {record['peak_mem_gib']:.2f} GiB allocated, {record['peak_reserved_gib']:.2f} GiB reserved"
        )  # noqa: T201
        assert record["peak_reserved_gib"] < QLORA_MEMORY_GIB, record


def test_cpu_smoke_of_the_gpu_sweep(tmp_path):
    """The GPU sweep's code path (CLI, overlay, callback, results, table) with the tiny model on CPU:
    fsdp2 only (~20 s); `LLAVA_GPU_SMOKE=1 pytest -m gpu tests/gpu` also runs ddp."""
    summary = run_all(SMOKE, tmp_path, strategies=("fsdp2",))
    _check(summary, SMOKE, ("fsdp2",))


def test_cpu_smoke_of_the_speed_ladder(tmp_path):
    """The speed ladder's runs (baseline, packed, packed into one row per batch under llava_varlen, the
    same without checkpointing) with the tiny model on CPU: each trains through the CLI with its own
    flags and reports every figure."""
    summary = run_all(SMOKE_SPEED, tmp_path)
    _check(summary, SMOKE_SPEED)
    logs = {run["strategy"]: Path(run["log"]).read_text().splitlines()[0] for run in summary["runs"]}
    assert "--data.pack_tokens=2048" not in logs["baseline"] and "--data.pack_tokens=2048" in logs["packed"]
    assert "attn_implementation=llava_varlen" in logs["packed-varlen"]
    assert "--data.pack_tokens=32768" in logs["packed-varlen"]
    assert "activation_checkpointing.language=none" in logs["packed-varlen-no-ckpt"]
    assert "activation_checkpointing.language=none" not in logs["packed-varlen"]


@pytest.mark.skipif(kernel_problem("4bit", "cpu") is not None, reason="no bitsandbytes 4-bit on the CPU")
def test_cpu_smoke_of_the_qlora_run(tmp_path):
    """The QLoRA run's path (CLI with model.stage qlora under ddp.yaml, callback, results, table) with the
    tiny model on CPU."""
    summary = run_all(SMOKE_QLORA, tmp_path)
    _check(summary, SMOKE_QLORA)
    log = Path(summary["runs"][0]["log"]).read_text()
    assert "qlora" in (tmp_path / "overlay-ddp.yaml").read_text() and "Traceback" not in log
