"""FSDP1 (`LlavaFSDPStrategy`): the wrap and checkpointing policies come from the model's declared blocks.

Lightning's FSDPStrategy needs CUDA to wrap, so on CPU the test stops at the parent's `_setup_model`
and checks what it would have been given; tests/gpu runs the wrapping itself.
"""

import pytest
from lightning.pytorch.strategies import FSDPStrategy

from llava_lightning.module import LlavaLitModule
from llava_lightning.training.fsdp1 import LlavaFSDPStrategy


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_policies_cover_every_declared_block(monkeypatch, checkpoint_blocks):
    seen = {}
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: seen.update(s=self) or model)
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    strategy = LlavaFSDPStrategy(checkpoint_blocks=checkpoint_blocks, sharding_strategy="HYBRID_SHARD")
    strategy._lightning_module = lit
    strategy._setup_model(lit)
    blocks = set(lit.model.block_classes().values())
    assert len(blocks) == 2  # the CLIP encoder layer and the Llama decoder layer
    assert set(seen["s"].kwargs["auto_wrap_policy"]._module_classes) == blocks
    checkpointing = seen["s"]._activation_checkpointing_kwargs
    if checkpoint_blocks:
        assert set(checkpointing["auto_wrap_policy"]._module_classes) == blocks
    else:
        assert checkpointing == {}
    assert strategy.sharding_strategy.name == "HYBRID_SHARD"


def test_an_explicit_wrap_policy_wins(monkeypatch):
    import torch

    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: model)
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    strategy = LlavaFSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    strategy._lightning_module = lit
    strategy._setup_model(lit)
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == {torch.nn.Linear}


def test_gradient_clipping_goes_through_the_root_fsdp_module():
    """Lightning's FSDP precision plugin refuses norm clipping; the module clips through the root
    FSDP module instead (which knows the sharded total norm)."""
    from types import SimpleNamespace

    clipped = []
    lit = LlavaLitModule(preset="tiny", stage="finetune")
    strategy = LlavaFSDPStrategy()
    strategy.model = SimpleNamespace(clip_grad_norm_=clipped.append)
    lit._trainer = SimpleNamespace(strategy=strategy)
    lit.configure_gradient_clipping(None, 1.0, "norm")
    assert clipped == [1.0]


def test_sharded_init_keeps_weights_on_rank_0_only_and_fsdp_copies_them_to_the_others(monkeypatch):
    import types

    import torch

    seen = {}
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: seen.update(s=self) or model)
    strategy = LlavaFSDPStrategy()
    strategy.parallel_devices = [torch.device("cpu")]
    per_rank = {}
    for rank in (0, 1):
        torch.manual_seed(0)
        lit = LlavaLitModule(preset="tiny", stage="finetune", sharded_init=True)
        lit._trainer = types.SimpleNamespace(strategy=strategy, global_rank=rank)
        lit.setup("validate")
        per_rank[rank] = lit
    # rank 0 built the weights (those of a plain build with the seed), rank 1 kept the skeleton
    torch.manual_seed(0)
    plain = LlavaLitModule(preset="tiny", stage="finetune")
    for p, q in zip(per_rank[0].parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(p.is_meta for p in per_rank[1].parameters())
    # every rank asks FSDP to allocate meta units and copy rank 0's parameters and buffers in
    strategy._lightning_module = per_rank[1]
    strategy._setup_model(per_rank[1])
    kwargs = seen["s"].kwargs
    assert kwargs["sync_module_states"] is True
    rotary = per_rank[1].model.language_model.model.rotary_emb
    kwargs["param_init_fn"](per_rank[1].model.multi_modal_projector.linear_1)
    kwargs["param_init_fn"](rotary)
    assert not per_rank[1].model.multi_modal_projector.linear_1.weight.is_meta
    assert not rotary.inv_freq.is_meta


def test_the_strategy_reads_the_module_only_through_scaling_hooks(monkeypatch):
    import lightning as L
    import torch

    from llava_lightning.training.scaling_hooks import ScalingHooks

    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, model: model)

    class Plain(L.LightningModule):  # any LightningModule that declares its blocks
        def scaling_hooks(self):
            return ScalingHooks({"mlp": torch.nn.Linear}, lambda: None, rank0_holds_weights=True)

    strategy = LlavaFSDPStrategy(parallel_devices=[torch.device("cpu")])
    strategy._lightning_module = Plain()
    strategy._setup_model(strategy._lightning_module)
    assert set(strategy.kwargs["auto_wrap_policy"]._module_classes) == {torch.nn.Linear}
    assert strategy.kwargs["sync_module_states"] is True  # rank 0's weights fill the others

    strategy = LlavaFSDPStrategy()
    strategy._lightning_module = L.LightningModule()
    with pytest.raises(TypeError, match="no scaling_hooks"):
        strategy._setup_model(strategy._lightning_module)
