"""Resume from any position of an epoch: the first batch, the middle, the last batch.

A checkpoint written on an epoch's last batch (`ModelCheckpoint(every_n_train_steps=...)` dividing
the epoch, a requeue at the epoch's end, the `last.ckpt` of a run `max_steps` stopped there) holds the
loader's position "epoch e, all its batches"; Lightning counts epoch e as done on resume, so that
position is the start of epoch e + 1, read whole and in epoch e + 1's order. The resumed run must
give the uninterrupted run's next losses, batch for batch, in every later epoch, and stop at the same
step.
"""

import os

import lightning as L
import pytest
import torch
from conftest import REPO, Numbers
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llava_lightning.data import LlavaDataModule, SourceConfig
from llava_lightning.data.mixture import WeightedMixture
from llava_lightning.data.sampler import EpochSampler, ResumableDataLoader
from llava_lightning.data.step_tokens import StepTokenLoader
from llava_lightning.module import LlavaLitModule, OptimConfig

CONF = REPO / "conf"


# -- the loaders alone -----------------------------------------------------------------------------


def _sampler_loader(workers=0):
    return ResumableDataLoader(Numbers(0, 22), EpochSampler(22, seed=4), batch_size=4, num_workers=workers)


def _mixture_loader(workers=0):
    mix = WeightedMixture([Numbers(0, 50), Numbers(1000, 30)], [2.0, 1.0], epoch_length=22, seed=3)
    return ResumableDataLoader(mix, batch_size=4, num_workers=workers)


def _set_epoch(loader, epoch):
    # What Lightning does for a sampler, and `LlavaLitModule.on_train_epoch_start` for a mixture.
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.dataset.set_epoch(epoch)


def _epochs(make, epochs=3):
    """The batches of `epochs` uninterrupted epochs, one list per epoch."""
    loader, out = make(), []
    for epoch in range(epochs):
        _set_epoch(loader, epoch)
        out.append([b.tolist() for b in loader])
    return out


@pytest.mark.parametrize(
    "make,workers", [(_sampler_loader, 0), (_sampler_loader, 2), (_mixture_loader, 0), (_mixture_loader, 2)]
)
def test_a_position_saved_on_the_epochs_last_batch_is_the_next_epochs_start(make, workers):
    full = _epochs(lambda: make(workers))
    batches = len(full[0])
    assert batches == 6 and full[0] != full[1]
    for epoch, position in [(0, 1), (0, 3), (0, batches), (1, batches)]:
        first = make(workers)
        _set_epoch(first, epoch)
        it = iter(first)
        for _ in range(position):  # the last batch handed out, the pass not finished: a checkpoint there
            next(it)
        state = first.state_dict()
        assert state == {"epoch": epoch, "batches": position}
        resumed = make(workers)
        resumed.load_state_dict(state)
        if position == batches:
            _set_epoch(resumed, epoch + 1)  # Lightning goes on with the next epoch
            assert [b.tolist() for b in resumed] == full[epoch + 1], (epoch, position)
        else:
            _set_epoch(resumed, epoch)  # Lightning continues the epoch
            assert [b.tolist() for b in resumed] == full[epoch][position:], (epoch, position)
            _set_epoch(resumed, epoch + 1)
            assert [b.tolist() for b in resumed] == full[epoch + 1]  # the position applied to one pass only


@pytest.mark.parametrize("make", [_sampler_loader, _mixture_loader])
def test_a_loaded_position_is_not_applied_to_another_epoch(make):
    full = _epochs(make)
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    _set_epoch(resumed, 1)  # the run moved on before reading (an epoch counted done)
    assert [b.tolist() for b in resumed] == full[1]
    assert resumed.state_dict() == {"epoch": 1, "batches": 0}


@pytest.mark.parametrize("make", [_sampler_loader, _mixture_loader])
def test_under_limit_train_batches_the_epochs_last_batch_is_the_limits(make):
    full = _epochs(make)
    first = StepTokenLoader.wrap(make(), accumulate=2, limit=4)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    assert state == {"loader": {"epoch": 0, "batches": 4}, "position": 4}
    resumed = StepTokenLoader.wrap(make(), accumulate=2, limit=4)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["loader"]["epoch"] == 1
    _set_epoch(resumed.loader, 1)
    assert [b.tolist() for b in resumed] == full[1][:4]
    # a checkpoint written before the wrapper existed (the loader's own state), at the limit
    legacy = StepTokenLoader.wrap(make(), accumulate=2, limit=4)
    legacy.load_state_dict({"epoch": 0, "batches": 4})
    _set_epoch(legacy.loader, 1)
    assert [b.tolist() for b in legacy] == full[1][:4]


# -- through the Trainer -----------------------------------------------------------------------------


class Steps(Callback):
    """Each micro-batch's (epoch, batch index, data fingerprint) and each optimizer step's logged loss;
    writes a checkpoint after the global steps in `save_at`, as `ModelCheckpoint(every_n_train_steps)`
    does (on_train_batch_end)."""

    def __init__(self, save_at=(), dirpath=None):
        self.batches, self.losses, self.save_at, self.dirpath, self.step = [], [], set(save_at), dirpath, None

    def on_train_start(self, trainer, module):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch_idx, int(batch["input_ids"].sum())))
        if trainer.global_step == self.step:
            return  # inside an accumulation group
        self.step = trainer.global_step
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        if self.step in self.save_at:
            trainer.save_checkpoint(os.path.join(self.dirpath, f"step={self.step}.ckpt"))


def _dm(shapes_dir, mixture, batch_size, workers, val=False):
    def source(name):
        return SourceConfig(
            kind="instruct", path=str(shapes_dir / "instruct" / name), image_root=str(shapes_dir / "instruct")
        )

    train = [source("llava_instruct.json")] + ([source("mc_train.json")] if mixture else [])
    return LlavaDataModule(
        train=train,
        val=[source("val.json")] if val else None,
        template="vicuna_v1",
        batch_size=batch_size,
        num_workers=workers,
        mixture_epoch_length=24 if mixture else None,
    )


def _fit(shapes_dir, tmp_path, callbacks, mixture, batch_size, workers=0, ckpt=None, val=False, **trainer_kw):
    torch.manual_seed(0)
    lit = LlavaLitModule(preset="tiny", stage="finetune", optim=OptimConfig(lr=1e-3))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_kw,
    )
    trainer.fit(lit, datamodule=_dm(shapes_dir, mixture, batch_size, workers, val), ckpt_path=ckpt)
    return trainer


def _difference(full, resumed, step):
    """How the resumed run differs from the uninterrupted run's steps after `step` (None: it does not)."""
    if len(resumed.losses) != len(full.losses) - step:
        return f"{len(resumed.losses)} steps, not {len(full.losses) - step}"
    if resumed.batches != full.batches[len(full.batches) - len(resumed.batches) :]:
        return f"other batches: (epoch, index, fingerprint) {resumed.batches}, not {full.batches}"
    if resumed.losses != pytest.approx(full.losses[step:], rel=1e-5):
        return f"other losses: {resumed.losses}, not {full.losses[step:]}"
    return None


def _assert_continues(full, resumed, step):
    difference = _difference(full, resumed, step)
    assert difference is None, f"resumed after step {step}: {difference}"


# Three epochs of 3 optimizer steps each; checkpoints after step 3 (the last batch of epoch 0), 4 (the
# first of epoch 1), 5 (its middle), 6 (its last). A single instruction source (48 records, batch 16)
# and a mixture of two (24 samples an epoch, batch 8), from each position; the mixture with 2 workers,
# and the instruction source with epochs cut to 5 batches of 8 by limit_train_batches and accumulation
# 2 (steps of 2, 2 and 1 batches: the epoch's last batch is the limit's), from the last and middle.
@pytest.mark.parametrize(
    "mixture,batch_size,workers,limit,accumulate,positions",
    [
        (False, 16, 0, 1.0, 1, [3, 4, 5, 6]),
        (True, 8, 0, 1.0, 1, [3, 4, 5, 6]),
        (True, 8, 2, 1.0, 1, [3, 5]),
        (False, 8, 0, 5, 2, [3, 5]),
    ],
    ids=["instruct", "mixture", "mixture-2-workers", "instruct-limit-accumulate"],
)
def test_resume_from_the_first_middle_and_last_batch_of_an_epoch(
    shapes_dir, tmp_path, mixture, batch_size, workers, limit, accumulate, positions
):
    kw = {"max_epochs": 3, "limit_train_batches": limit, "accumulate_grad_batches": accumulate}
    full = Steps(save_at=positions, dirpath=tmp_path)
    _fit(shapes_dir, tmp_path, [full], mixture, batch_size, workers, **kw)
    assert len(full.losses) == 9 and {e for e, _, _ in full.batches} == {0, 1, 2}
    differences = {}
    for step in positions:
        resumed = Steps()
        ckpt = str(tmp_path / f"step={step}.ckpt")
        _fit(shapes_dir, tmp_path, [resumed], mixture, batch_size, workers, ckpt=ckpt, **kw)
        differences[step] = _difference(full, resumed, step)
    assert differences == dict.fromkeys(positions), "resumed after step: how the run differs"


# `ModelCheckpoint`'s own end-of-epoch save (on_train_epoch_end, after Lightning counted the epoch
# processed; the state of the validation loop too in the second case), resumed under max_epochs.
@pytest.mark.parametrize("mixture,val", [(False, False), (True, True)], ids=["instruct", "mixture-val"])
def test_resume_from_modelcheckpoints_end_of_epoch_checkpoint(shapes_dir, tmp_path, mixture, val):
    batch_size = 8 if mixture else 16
    full = Steps()
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", save_top_k=-1)
    kw = {"max_epochs": 3, "val": val}
    _fit(shapes_dir, tmp_path, [full, ckpts], mixture, batch_size, **kw)
    resumed = Steps()
    ckpt = str(tmp_path / "ck" / "step=3.ckpt")
    _fit(shapes_dir, tmp_path, [resumed], mixture, batch_size, ckpt=ckpt, **kw)
    _assert_continues(full, resumed, 3)


def _after_fit_stopped_at_epoch_end(shapes_dir, tmp_path):
    """A checkpoint written by `trainer.save_checkpoint` after a fit that `max_steps` stopped on an
    epoch's last batch (the loop state of an `on_train_end` save)."""
    trainer = _fit(shapes_dir, tmp_path, [], False, 16, max_epochs=3, max_steps=3)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    return str(tmp_path / "after_fit.ckpt")


def _assert_same_batches_after(full, resumed, step):
    # That run's schedule was max_steps long, so only the batches are comparable, not the losses.
    assert len(resumed.losses) == len(full.losses) - step
    assert resumed.batches == full.batches[len(full.batches) - len(resumed.batches) :]


def test_resume_after_a_fit_that_stopped_at_an_epochs_end(shapes_dir, tmp_path):
    full = Steps()
    _fit(shapes_dir, tmp_path, [full], False, 16, max_epochs=3)
    ckpt, resumed = _after_fit_stopped_at_epoch_end(shapes_dir, tmp_path), Steps()
    _fit(shapes_dir, tmp_path, [resumed], False, 16, ckpt=ckpt, max_epochs=3)
    _assert_same_batches_after(full, resumed, 3)


# Checkpoints written after an epoch's last batch had run through, resumed with max_steps set:
# Lightning's loop (issue #19617) runs an epoch with no batches and counts it, so an epoch of data is
# left out (the run ends an epoch early under max_epochs) and the samplers' epochs are one ahead.
@pytest.mark.parametrize("saved", ["on_train_epoch_end", "after_fit"])
def test_resume_under_max_steps_from_a_checkpoint_written_after_the_epochs_last_batch(
    shapes_dir, tmp_path, saved
):
    kw = {"max_epochs": 3, "max_steps": 9}
    full = Steps()
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", save_top_k=-1)
    _fit(shapes_dir, tmp_path, [full, ckpts], False, 16, **kw)
    resumed = Steps()
    if saved == "after_fit":
        ckpt = _after_fit_stopped_at_epoch_end(shapes_dir, tmp_path)
        _fit(shapes_dir, tmp_path, [resumed], False, 16, ckpt=ckpt, **kw)
        _assert_same_batches_after(full, resumed, 3)
    else:
        _fit(shapes_dir, tmp_path, [resumed], False, 16, ckpt=str(tmp_path / "ck" / "step=3.ckpt"), **kw)
        _assert_continues(full, resumed, 3)


# -- through the CLI ---------------------------------------------------------------------------------


def test_cli_resume_from_the_checkpoint_of_an_epochs_last_batch(shapes_dir, tmp_path, monkeypatch):
    from llava_lightning.cli import main

    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)  # tiny.yaml names data/shapes relative to the working directory
    # Stage 2 on the tiny overlay: its mixture of two instruction sources, 32 samples an epoch in batches
    # of 16 (2 steps), 3 epochs; a checkpoint every 2 steps (each epoch's last batch).
    callbacks = (
        '[{"class_path": "test_resume.Steps"}, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
        f'"init_args": {{"dirpath": "{tmp_path}/ck", "filename": "{{step}}", "every_n_train_steps": 2, '
        '"save_top_k": -1}}]'
    )
    args = [
        "fit", "-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"), "--trainer.max_epochs=3",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
        f"--trainer.callbacks={callbacks}", "--data.num_workers=0", "--data.batch_size=16",
        "--data.mixture_epoch_length=32",
    ]  # fmt: skip

    def steps(cli):
        (recorder,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Steps"]
        return recorder

    full = steps(main(args))
    assert len(full.losses) == 6
    resumed = steps(main([*args, f"--ckpt_path={tmp_path}/ck/step=2.ckpt"]))
    _assert_continues(full, resumed, 2)
