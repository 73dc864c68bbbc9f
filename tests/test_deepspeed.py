"""DeepSpeed ZeRO (`LlavaDeepSpeedStrategy`): the YAMLs build the stage they name, and the strategy
accumulates like the others (Lightning's boundaries, no second division by the accumulation steps).

Lightning runs DeepSpeed on CUDA only: most tests build the strategy and call its hooks without an
engine. The last ones run real ZeRO-2 / ZeRO-3 steps on 2 CPU processes (DeepSpeed's CPU accelerator,
tests/deepspeed_cpu_fit.py) against one process on the same global batch; tests/gpu runs CUDA.
"""

import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, trainer_for_strategy_yaml

pytest.importorskip("deepspeed")

from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

from llava_lightning.module import LlavaLitModule  # noqa: E402
from llava_lightning.training.deepspeed import LlavaDeepSpeedStrategy  # noqa: E402

CONF = REPO / "conf"


@pytest.mark.parametrize(
    "name,stage,offload",
    [
        ("deepspeed_zero2.yaml", 2, False),
        ("deepspeed_zero3.yaml", 3, False),
        ("deepspeed_zero3_offload.yaml", 3, True),
    ],
)
def test_deepspeed_yamls_build_the_zero_stage_they_name(name, stage, offload):
    trainer = trainer_for_strategy_yaml(name)
    strategy = trainer.strategy
    assert type(strategy) is LlavaDeepSpeedStrategy and trainer.precision == "bf16-mixed"
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is offload and ("offload_param" in zero) is offload
    assert strategy.offloads_optimizer is offload
    assert strategy.checkpoint_blocks and not strategy.handles_gradient_accumulation


def test_an_offloaded_optimizer_is_deepspeeds_cpu_adamw_with_the_same_groups(monkeypatch):
    import deepspeed.ops.adam

    made = {}

    class FakeCPUAdam:  # the real one compiles DeepSpeed's cpu_adam op on first use
        def __init__(self, groups, **kwargs):
            made.update(groups=groups, **kwargs)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", FakeCPUAdam)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "projector"}]
    plain = LlavaDeepSpeedStrategy(stage=3).make_optimizer(groups, lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    assert type(plain) is torch.optim.AdamW
    offloaded = LlavaDeepSpeedStrategy(stage=3, offload_optimizer=True).make_optimizer(groups, lr=1e-3)
    assert isinstance(offloaded, FakeCPUAdam) and made == {"groups": groups, "lr": 1e-3, "adamw_mode": True}


def test_configure_optimizers_asks_the_strategy_for_the_optimizer(monkeypatch):
    import lightning as L

    lit = LlavaLitModule(preset="tiny", stage="finetune")
    strategy = LlavaDeepSpeedStrategy(stage=2)
    asked = {}
    monkeypatch.setattr(
        LlavaDeepSpeedStrategy,
        "make_optimizer",
        lambda self, groups, **kw: asked.update(kw) or torch.optim.SGD(groups),
    )
    lit.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    monkeypatch.setattr(type(lit.trainer), "strategy", property(lambda self: strategy))
    assert type(lit.configure_optimizers()["optimizer"]) is torch.optim.SGD and asked["lr"] == lit.optim.lr


def test_backward_does_not_divide_by_the_accumulation_steps_again(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        DeepSpeedStrategy, "backward", lambda self, loss, opt, *a, **kw: seen.update(kw) or loss
    )
    LlavaDeepSpeedStrategy().backward(torch.ones(()), None)
    assert seen == {"scale_wrt_gas": False}  # the precision plugin passes it to engine.backward


@pytest.mark.parametrize("should_accumulate", [True, False])
def test_every_micro_batch_tells_the_engine_whether_it_closes_lightnings_group(
    monkeypatch, should_accumulate
):
    boundaries = []
    engine = SimpleNamespace(set_gradient_accumulation_boundary=boundaries.append)
    fit_loop = SimpleNamespace(_should_accumulate=lambda: should_accumulate)
    module = SimpleNamespace(trainer=SimpleNamespace(training=True, fit_loop=fit_loop))
    monkeypatch.setattr(DeepSpeedStrategy, "training_step", lambda self, *a, **kw: "parent ran")
    monkeypatch.setattr(LlavaDeepSpeedStrategy, "lightning_module", property(lambda self: module))
    monkeypatch.setattr(LlavaDeepSpeedStrategy, "deepspeed_engine", property(lambda self: engine))
    assert LlavaDeepSpeedStrategy().training_step({"batch": 0}, 0) == "parent ran"
    assert boundaries == [not should_accumulate]


def test_checkpoint_blocks_checkpoints_every_trained_declared_block_before_deepspeed_wraps(monkeypatch):
    monkeypatch.setattr(DeepSpeedStrategy, "setup", lambda self, trainer: None)
    lit = LlavaLitModule(preset="tiny", stage="full")
    strategy = LlavaDeepSpeedStrategy(checkpoint_blocks=True)
    strategy._lightning_module = lit
    strategy.setup(None)
    assert lit.gradient_checkpointing
    for component, cls in lit.model.block_classes().items():
        blocks = [m for m in getattr(lit.model, component).modules() if isinstance(m, cls)]
        assert blocks and all(m.gradient_checkpointing for m in blocks), component


def test_a_strategy_that_accumulates_on_its_own_is_refused_with_accumulation():
    lit = LlavaLitModule(preset="tiny", stage="align")
    lit._trainer = SimpleNamespace(accumulate_grad_batches=2, strategy=DeepSpeedStrategy())
    with pytest.raises(ValueError, match="LlavaDeepSpeedStrategy"):
        lit.setup("fit")
    lit._trainer = SimpleNamespace(accumulate_grad_batches=1, strategy=DeepSpeedStrategy())
    lit.setup("fit")  # without accumulation every micro-batch is a step: exact under plain DeepSpeed
    lit._trainer = SimpleNamespace(accumulate_grad_batches=2, strategy=LlavaDeepSpeedStrategy())
    lit.setup("fit")


def test_an_empty_batch_runs_the_modules_of_a_batch_with_an_image():
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    lit._trainer = SimpleNamespace(strategy=LlavaDeepSpeedStrategy())
    calls = []
    lit.model.vision_tower.register_forward_hook(lambda *a: calls.append("vision_tower"))
    lit.model.multi_modal_projector.register_forward_hook(lambda *a: calls.append("projector"))
    loss = lit._empty_batch_loss()
    assert calls == ["vision_tower", "projector"] and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in lit.parameters() if p.requires_grad and p.grad is not None]
    assert lit.model.multi_modal_projector.linear_1.weight.grad is not None
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def _cpu_step(tmp_path, mode: str, devices: int, batch_size: int, accumulate: int, shapes_dir) -> dict:
    """Parameter change of one SGD step (lr 1) from tests/deepspeed_cpu_fit.py in fresh processes."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{mode}.pt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    script = REPO / "tests" / "deepspeed_cpu_fit.py"
    cmd = [
        sys.executable,
        str(script),
        str(out),
        str(shapes_dir),
        mode,
        str(devices),
        str(batch_size),
        str(accumulate),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_large_batch_step(shapes_dir, tmp_path_factory):
    return _cpu_step(tmp_path_factory.mktemp("plain"), "plain", 1, 4, 1, shapes_dir)


# DeepSpeed builds its CPU communication op on first use (ninja comes with deepspeed; the compiler not).
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None, reason="DeepSpeed's CPU runs build a C++ op: no C++ compiler (c++) here"
)


@needs_compiler
@pytest.mark.parametrize("mode", ["zero2", "zero3", "zero3-sharded", "zero3-pretrained"])
def test_zero_on_two_cpu_processes_with_accumulation_steps_with_the_one_large_batch_gradient(
    shapes_dir, tmp_path, one_large_batch_step, mode
):
    # The step's 4 samples, dealt to 2 ranks x 2 micro-batches of 1: uneven token counts per rank and
    # micro-batch, and one micro-batch is text-only (its rank still runs the tower and projector).
    # zero3-sharded / zero3-pretrained: built under zero.Init (sharded_init), from the same weights as the
    # plain build (saved as hub-style part folders / as one llava-hf folder loaded with `pretrained`).
    zero = _cpu_step(tmp_path, mode, 2, 1, 2, shapes_dir)
    assert set(zero) == set(one_large_batch_step)
    for name, expected in one_large_batch_step.items():
        torch.testing.assert_close(zero[name], expected, rtol=1e-3, atol=1e-6, msg=name)


@needs_compiler
def test_export_consolidates_a_zero3_checkpoint_folder(shapes_dir, tmp_path):
    """`export`'s consolidation turns the per-rank ZeRO-3 shards back into the full trained weights."""
    from llava_lightning.training.consolidate import consolidated

    _cpu_step(tmp_path, "zero3", 2, 1, 1, shapes_dir)
    folder = tmp_path / "zero3.pt.ckpt"
    assert folder.is_dir()
    after = torch.load(tmp_path / "zero3.pt.after", weights_only=True)
    with consolidated(folder) as path:
        state = torch.load(path, weights_only=True)["state_dict"]
    for name, value in after.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
