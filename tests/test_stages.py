"""Stage freezing as plain functions on a `LlavaModel` (no Trainer, no LightningModule)."""

import pytest

from llava_lightning import LlavaModel
from llava_lightning.training import stages


@pytest.fixture
def model():
    return LlavaModel.from_preset("tiny")


def _trains(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _all_train(module) -> bool:
    return all(p.requires_grad for p in module.parameters())


def test_align_finetune_full(model):
    stages.freeze_for_align(model)
    assert _all_train(model.multi_modal_projector)
    assert not _trains(model.vision_tower) and not _trains(model.language_model)

    stages.freeze_for_finetune(model)
    assert _all_train(model.multi_modal_projector) and _all_train(model.language_model)
    assert not _trains(model.vision_tower)

    stages.freeze_for_full(model)
    tower = model.vision_tower
    assert tower.blocks_run < len(tower.blocks())  # the tiny preset reads layer -2: one block never runs
    assert all(_all_train(b) for b in tower.blocks()[: tower.blocks_run])
    assert not any(_trains(b) for b in tower.blocks()[tower.blocks_run :])
    assert _all_train(model.language_model)


def test_unfreeze_last_vision_blocks_counts_blocks_that_run(model):
    stages.apply_stage(model, "align", unfreeze_vision_blocks=1)
    tower = model.vision_tower
    flags = [_trains(b) for b in tower.blocks()]
    assert flags[tower.blocks_run - 1] and sum(flags) == 1
    assert not _trains(model.language_model)


def test_components_are_the_transformers_names(model):
    assert list(stages.components(model)) == ["vision_tower", "multi_modal_projector", "language_model"]


def test_block_checkpointing_turns_on_only_for_trained_components(model):
    stages.apply_stage(model, "align", gradient_checkpointing=True)
    assert not model.language_model.is_gradient_checkpointing  # frozen: nothing to recompute
    stages.apply_stage(model, "finetune", gradient_checkpointing=True)
    assert model.language_model.is_gradient_checkpointing


def test_anyres_image_newline_trains_with_the_language_model():
    """LLaVA-NeXT's rule: frozen in stage 1 (projector only), trained in stage 2, full and LoRA; its own
    AdamW group at the LLM's rate, without weight decay."""
    from llava_lightning.training.params import param_groups

    model = LlavaModel.from_preset("tiny-next")
    stages.freeze_for_align(model)
    assert not model.image_newline.requires_grad
    for stage in ("finetune", "full", "lora"):
        stages.apply_stage(model, stage)
        assert model.image_newline.requires_grad, stage
    groups = param_groups({"image_newline": (model.image_newline, 0.5)}, weight_decay=0.1)
    assert groups == [
        {"name": "image_newline/no_decay", "params": [model.image_newline], "lr": 0.5, "weight_decay": 0.0}
    ]
