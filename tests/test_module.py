"""LlavaLitModule: per-stage trainable sets, token-normalized loss under accumulation, resume, hand-off."""

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback

from llava_lightning.data import LlavaDataModule, SourceConfig
from llava_lightning.module import LlavaLitModule, OptimConfig


def _trainable(lit, component):
    return {n for n, p in getattr(lit.model, component).named_parameters() if p.requires_grad}


def _count(lit, component):
    return sum(p.numel() for p in getattr(lit.model, component).parameters() if p.requires_grad)


def test_align_trains_only_the_projector():
    lit = LlavaLitModule(preset="tiny", stage="align")
    assert _count(lit, "vision_tower") == 0 and _count(lit, "language_model") == 0
    assert _count(lit, "multi_modal_projector") == sum(
        p.numel() for p in lit.model.multi_modal_projector.parameters()
    )
    lit.train()
    assert not lit.model.vision_tower.training and not lit.model.language_model.training
    assert lit.model.multi_modal_projector.training


def test_finetune_trains_projector_and_llm_and_full_everything_that_runs():
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    assert _count(lit, "vision_tower") == 0
    assert _count(lit, "language_model") == sum(p.numel() for p in lit.model.language_model.parameters())
    full = LlavaLitModule(preset="tiny", stage="full")
    trainable = _trainable(full, "vision_tower")
    assert any(".layers.0." in n for n in trainable) and any(".layers.2." in n for n in trainable)
    # feature layer -2 of 4 blocks: block 3 and the pooled-output norm never run, so never train
    assert not any(".layers.3." in n or "post_layernorm" in n for n in trainable)


def test_unfreeze_last_vision_blocks_counts_blocks_that_run():
    lit = LlavaLitModule(preset="tiny", stage="finetune", unfreeze_vision_blocks=1)
    trainable = _trainable(lit, "vision_tower")
    assert trainable and all(".layers.2." in n for n in trainable)


def test_lora_trains_adapters_and_projector_only():
    # peft is the `lora` extra; `make test` installs it with the dev extra.
    lit = LlavaLitModule(preset="tiny", stage="lora")
    names = _trainable(lit, "language_model")
    assert names and all("lora_" in n for n in names)
    assert _count(lit, "multi_modal_projector") > 0 and _count(lit, "vision_tower") == 0
    assert any(g["name"].startswith("multi_modal_projector") for g in _groups(lit))


def _same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_sharded_init_builds_an_empty_skeleton_and_non_fsdp2_strategies_get_the_eager_weights():
    torch.manual_seed(0)
    eager = LlavaLitModule(preset="tiny", stage="finetune")
    torch.manual_seed(0)
    lit = LlavaLitModule(preset="tiny", stage="finetune", sharded_init=True)
    # No storage at all (meta), same names, shapes and trainable set as the eager build.
    assert all(p.is_meta for p in lit.parameters())
    assert {n: (p.shape, p.requires_grad) for n, p in lit.named_parameters()} == {
        n: (p.shape, p.requires_grad) for n, p in eager.named_parameters()
    }
    # A strategy that does not shard (here one device) builds the full model in `setup`, from the RNG
    # state `__init__` saw: the weights the eager build has.
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False)
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader([]))
    _same_weights(lit, eager)
    assert [n for n, p in lit.named_parameters() if p.requires_grad] == [
        n for n, p in eager.named_parameters() if p.requires_grad
    ]


def test_a_sharded_init_skeleton_loads_a_checkpoint():
    # `load_from_checkpoint` (export, notebooks): the skeleton gets storage first, then the weights.
    eager = LlavaLitModule(preset="tiny", stage="finetune")
    lit = LlavaLitModule(preset="tiny", stage="finetune", sharded_init=True)
    state = {f"model.{k}": v for k, v in eager.model.state_dict().items()}
    lit.on_load_checkpoint({"state_dict": state})
    lit.load_state_dict(state)
    _same_weights(lit, eager)


@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp2"])
def test_sharding_strategies_run_the_tower_on_text_only_batches_in_every_loop(strategy):
    # Under FSDP2 / FSDP / DeepSpeed a validation rank without images must still gather the tower's
    # parameters with the others (LlavaModel.embed's blank-image path); DDP and one device need not.
    from llava_lightning.training.fsdp2 import FSDP2Strategy

    lit = LlavaLitModule(preset="tiny", stage="finetune")
    lit.trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=FSDP2Strategy() if strategy == "fsdp2" else strategy,
        logger=False,
    )
    lit.setup("validate")
    assert lit.model.tower_on_text_only is (strategy == "fsdp2")


def test_sharded_init_with_lora_is_refused():
    with pytest.raises(ValueError, match="lora"):
        LlavaLitModule(preset="tiny", stage="lora", sharded_init=True)


def _groups(lit):
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    lit.trainer = trainer
    return lit.configure_optimizers()["optimizer"].param_groups


def test_param_groups_separate_rates_and_no_decay_for_biases_and_norms():
    lit = LlavaLitModule(
        preset="tiny",
        stage="full",
        optim=OptimConfig(lr=1e-4, projector_lr=1e-3, vision_lr=1e-5, weight_decay=0.1),
    )
    groups = {g["name"]: g for g in _groups(lit)}
    assert groups["multi_modal_projector"]["lr"] == 1e-3 and groups["vision_tower"]["lr"] == 1e-5
    assert groups["language_model"]["lr"] == 1e-4 and groups["language_model"]["weight_decay"] == 0.1
    assert groups["language_model/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in groups["language_model/no_decay"]["params"])
    assert all(p.ndim >= 2 for p in groups["language_model"]["params"])


class GradRecorder(Callback):
    """Keeps a copy of the (already normalized) gradients of each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        pass  # module hook scales first; the copy is taken in on_train_batch_end of the stepping batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.grads.append(module._last_grads)


class RecordingLit(LlavaLitModule):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self._last_grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def _instruct_dm(shapes_dir, batch_size, **kw):
    return LlavaDataModule(
        train=[
            SourceConfig(
                kind="instruct",
                path=str(shapes_dir / "instruct/llava_instruct.json"),
                image_root=str(shapes_dir / "instruct"),
            )
        ],
        template="vicuna_v1",
        batch_size=batch_size,
        num_workers=0,
        **kw,
    )


def test_accumulation_with_uneven_lengths_gives_the_large_batch_gradient(shapes_dir, tmp_path):
    grads = []
    for batch, accumulate in [(4, 1), (2, 2), (1, 4)]:
        torch.manual_seed(0)
        lit = RecordingLit(preset="tiny", stage="finetune")
        dm = _instruct_dm(shapes_dir, batch)
        rec = GradRecorder()
        quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, callbacks=[rec]).fit(
            lit, datamodule=dm
        )
        grads.append(rec.grads[0])
    for other in grads[1:]:
        assert set(other) == set(grads[0])
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


class StepGradRecorder(LlavaLitModule):
    """Keeps the (normalized) gradients of every optimizer step, the short last one of an epoch too."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if not hasattr(self, "step_grads"):
            self.step_grads = []
        self.step_grads.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})


def test_the_short_last_group_of_an_epoch_gives_its_large_batch_gradient(shapes_dir, tmp_path):
    # lr 0: the parameters stay put, so a step's gradient depends on its samples only. Epoch positions
    # 24..31 are the last, short group of 4-sample batches 6, 7 with accumulation 3 (groups 0-2, 3-5,
    # 6-7 of the 8 batches run), and the 4th batch of 8 samples.
    grads = []
    for batch, accumulate, batches, step in [(4, 3, 8, 2), (8, 1, 4, 3)]:
        torch.manual_seed(0)
        lit = StepGradRecorder(preset="tiny", stage="finetune", optim=OptimConfig(lr=0.0))
        trainer = quiet_trainer(
            tmp_path, max_epochs=1, limit_train_batches=batches, accumulate_grad_batches=accumulate
        )
        trainer.fit(lit, datamodule=_instruct_dm(shapes_dir, batch))
        assert len(lit.step_grads) == step + 1
        grads.append(lit.step_grads[step])
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "mlp3x_gelu", "identity"])
def test_every_projector_type_runs_a_forward_and_a_training_step(shapes_dir, tmp_path, projector):
    from conftest import image_batch, sample_ids

    from llava_lightning.model import get_preset

    spec = get_preset("tiny")  # CLIP and LLM widths are equal (128), as `identity` needs
    spec.projector = projector
    lit = LlavaLitModule(spec=spec, stage="finetune", optim=OptimConfig(lr=1e-2))
    model = lit.model
    ids = sample_ids(model, 1)[None]
    out = model(ids, pixel_values=image_batch(model, 1), labels=ids)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == ids.shape
    before = {n: p.detach().clone() for n, p in lit.named_parameters() if p.requires_grad}
    quiet_trainer(tmp_path, max_steps=1).fit(lit, datamodule=_instruct_dm(shapes_dir, 2))
    changed = {n for n, p in lit.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any(n.startswith("model.language_model.") for n in changed)
    projector_weights = {n for n in before if n.startswith("model.multi_modal_projector.")}
    assert projector_weights <= changed and (projector_weights or projector == "identity")


class LossRecorder(Callback):
    """The logged train/loss of each optimizer step (saving a checkpoint and stopping after `stop_at`)."""

    def __init__(self, stop_at=None, path=None):
        self.losses, self.stop_at, self.path, self.step = [], stop_at, path, None

    def on_train_start(self, trainer, module):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            return  # inside an accumulation group
        self.step = trainer.global_step
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        if self.stop_at is not None and trainer.global_step == self.stop_at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


# max_epochs set: the schedule's step count then comes from the loader's length, which makes
# Lightning build the loader before it restores the position (the recipes all set max_epochs).
# A mixture of map-style sources (conf/tiny.yaml's stage 2) resumes too. With accumulation 3 and
# epochs cut to 5 batches, an epoch is a step of 3 batches and a short one of 2; the checkpoint falls
# after step 3 (the 3rd batch of epoch 1), and the resumed run ends that epoch with its short step
# and goes on into the next.
@pytest.mark.parametrize(
    "max_epochs,mixture,accumulate,limit,steps",
    [(None, False, 1, 1.0, 8), (1, False, 1, 1.0, 8), (1, True, 1, 1.0, 8), (None, False, 3, 5, 5)],
)
def test_resume_mid_epoch_gives_the_uninterrupted_runs_next_losses(
    shapes_dir, tmp_path, max_epochs, mixture, accumulate, limit, steps
):
    def run(callback, ckpt=None):
        torch.manual_seed(0)
        lit = LlavaLitModule(preset="tiny", stage="finetune", optim=OptimConfig(lr=1e-3))
        dm = _instruct_dm(shapes_dir, 4)
        if mixture:
            mc = SourceConfig(
                kind="instruct",
                path=str(shapes_dir / "instruct/mc_train.json"),
                image_root=str(shapes_dir / "instruct"),
            )
            dm = _instruct_dm(shapes_dir, 4, mixture_epoch_length=48)
            dm.train_sources = [*dm.train_sources, mc]
        trainer = quiet_trainer(
            tmp_path,
            max_steps=steps,
            max_epochs=max_epochs,
            limit_train_batches=limit,
            accumulate_grad_batches=accumulate,
            callbacks=[callback],
        )
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt)

    full = LossRecorder()
    run(full)
    first = LossRecorder(stop_at=3, path=tmp_path / "k.ckpt")
    run(first)
    resumed = LossRecorder()
    run(resumed, ckpt=str(tmp_path / "k.ckpt"))
    assert len(full.losses) == steps and first.losses == pytest.approx(full.losses[:3], rel=1e-6)
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-5)


def test_align_writes_a_projector_artifact_that_stage_2_loads(shapes_dir, tmp_path):
    lit = LlavaLitModule(preset="tiny", stage="align", optim=OptimConfig(lr=1e-2))
    before = {k: v.clone() for k, v in lit.model.multi_modal_projector.state_dict().items()}
    dm = LlavaDataModule(
        train=[SourceConfig(kind="captions", path=str(shapes_dir / "captions/shard-{00000..00002}.tar"))],
        template="plain",
        batch_size=8,
        num_workers=0,
    )
    quiet_trainer(tmp_path, max_steps=3).fit(lit, datamodule=dm)
    artifact = tmp_path / "projector.safetensors"
    assert artifact.exists() and artifact.with_suffix(".json").exists()
    trained = lit.model.multi_modal_projector.state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)
    stage2 = LlavaLitModule(preset="tiny", stage="finetune", init_projector=str(artifact))
    for k, v in stage2.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, trained[k])
    # A stage-2 checkpoint loads (chat, serve, evaluate, export) where the stage-1 file is gone.
    with torch.no_grad():
        for p in stage2.model.multi_modal_projector.parameters():
            p.add_(1.0)
    trainer = quiet_trainer(tmp_path)
    trainer.strategy.connect(stage2)
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    artifact.unlink()
    loaded = LlavaLitModule.load_from_checkpoint(
        tmp_path / "stage2.ckpt", map_location="cpu", weights_only=True
    )
    for k, v in loaded.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, trained[k] + 1.0)


def test_validation_reports_loss_perplexity_and_accuracy(shapes_dir, tmp_path):
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    dm = _instruct_dm(shapes_dir, 8)
    dm.val_sources = dm.train_sources
    metrics = quiet_trainer(tmp_path, limit_val_batches=2).validate(lit, datamodule=dm)[0]
    assert metrics["val/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["val/loss"])).item(), rel=1e-4)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0
    assert metrics["val/loss"] > 0
