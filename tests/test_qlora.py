"""Stage qlora (bitsandbytes NF4 LLM + LoRA): what trains, exact checkpoint restore, the refusal where
bitsandbytes cannot run, and fit -> resume -> export through the CLI, the export checked against the
adapted model with transformers' `LlavaForConditionalGeneration`.

These need bitsandbytes (the `qlora` extra, in `dev`) with 4-bit kernels on the CPU (bitsandbytes >= 0.45
has them); elsewhere they skip, except the refusal tests, which need none.
"""

import csv
import glob
import os

import pytest
import torch
from conftest import REPO

from llava_lightning.module import LlavaLitModule
from llava_lightning.training import quantization
from llava_lightning.training.settings import LoraConfig, QLoraConfig

CONF = REPO / "conf"
CPU_4BIT = quantization.kernel_problem("4bit", "cpu")
needs_4bit = pytest.mark.skipif(CPU_4BIT is not None, reason=f"no bitsandbytes 4-bit on the CPU: {CPU_4BIT}")
SMALL_LORA = LoraConfig(r=8, alpha=16, dropout=0.0)


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = model.vision_tower.num_tokens
    ids = torch.tensor([[1, 5, 6] + [model.image_token_id] * n + [7, 8, 9, 10]])
    size = model.vision_tower.image_size
    return ids, torch.randn(1, 3, size, size, generator=g)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.language_model.modules() if isinstance(m, LoraLayer)]


@needs_4bit
def test_qlora_quantizes_llm_linears_and_trains_adapters_and_projector_only():
    import bitsandbytes as bnb

    lit = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA)
    model = lit.model
    lm = model.language_model.get_base_model()
    quantized = [m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    cfg = lm.config
    assert len(quantized) == cfg.num_hidden_layers * 7  # q, k, v, o, gate, up, down
    for layer in quantized:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_type == "nf4"
        assert layer.weight.compress_statistics and layer.compute_dtype == torch.bfloat16
        assert not layer.weight.requires_grad
    head = lm.get_output_embeddings()
    assert (
        type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and not head.weight.requires_grad
    )
    assert len(_lora_layers(model)) == len(quantized)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("multi_modal_projector.") for n in trainable)
    assert {n for n in trainable if n.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.{n}" for n, _ in model.multi_modal_projector.named_parameters()
    }
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


@needs_4bit
def test_quantized_layer_matches_its_float_layer_within_nf4_rounding():
    # NF4 (blocks of 64, double quantization) rounds Gaussian weights with a relative mean error of ~0.09.
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = quantization._linear4bit(linear, QLoraConfig(compute_dtype="float32"), "cpu")
    error = (quantization.dequantized_weight(layer) - linear.weight).abs().mean() / linear.weight.abs().mean()
    assert 0.03 < error < 0.15
    x = torch.randn(8, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ quantization.dequantized_weight(layer).T + linear.bias)


@needs_4bit
def test_load_state_dict_restores_the_packed_weights_and_quant_state_exactly(tmp_path):
    torch.manual_seed(0)
    trained = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA)
    for layer in _lora_layers(trained.model):  # adapters as after training: B no longer zero
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    torch.save(trained.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert any(k.endswith(".weight.absmax") for k in state)
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in state)

    torch.manual_seed(1)  # other random base weights, so other 4-bit weights and scales
    restored = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA)
    assert not all(torch.equal(v, restored.state_dict()[k]) for k, v in state.items())
    restored.load_state_dict(state, strict=True)
    again = restored.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    ids, pixels = _inputs(trained.model)
    with torch.no_grad():
        torch.testing.assert_close(
            restored.model.eval()(ids, pixel_values=pixels).logits,
            trained.model.eval()(ids, pixel_values=pixels).logits,
            rtol=0,
            atol=0,
        )


def test_qlora_is_refused_without_bitsandbytes(monkeypatch):
    quantization.kernel_problem.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails
    try:
        with pytest.raises(quantization.QuantizationUnavailableError) as info:
            LlavaLitModule(preset="tiny", stage="qlora")
    finally:
        quantization.kernel_problem.cache_clear()
    message = str(info.value)
    assert "bitsandbytes is not installed" in message and "llava-lightning[qlora]" in message
    assert "stage 'lora'" in message


def test_qlora_is_refused_where_the_training_device_has_no_4bit_kernels(monkeypatch, tmp_path):
    """Built (quantized) where bitsandbytes runs, refused when the trainer's device cannot run it."""
    import lightning as L

    if CPU_4BIT is not None:
        pytest.skip(f"no bitsandbytes 4-bit on the CPU: {CPU_4BIT}")
    lit = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA)
    real = quantization.kernel_problem

    def probe(kind, device):
        return "it has no CPU backend (probe patched)" if device == "cpu" else real(kind, device)

    monkeypatch.setattr(quantization, "kernel_problem", probe)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, max_steps=1)  # fmt: skip
    trainer.strategy.connect(lit)
    lit.trainer = trainer
    with pytest.raises(
        quantization.QuantizationUnavailableError, match=r"4-bit kernels on cpu.*no CPU backend"
    ):
        lit.setup("fit")


@needs_4bit
def test_qlora_refuses_sharding_strategies_and_sharded_init():
    from lightning.pytorch.strategies import FSDPStrategy

    from llava_lightning.training.strategies import check_qlora

    lit = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA)
    with pytest.raises(ValueError, match="ddp"):
        check_qlora(lit, FSDPStrategy())
    with pytest.raises(ValueError, match="qlora"):
        LlavaLitModule(preset="tiny", stage="qlora", sharded_init=True)


def _train_losses(metrics_csv):
    with open(metrics_csv) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@needs_4bit
def test_qlora_fit_resume_export_through_the_cli(shapes_dir, tmp_path, monkeypatch, capsys):
    """fit (a few steps lower the loss) -> resume -> export; the export, loaded by transformers, computes
    what the adapted model computes.

    Tolerances: the adapted model multiplies in its 4-bit layers' compute dtype (bf16: inputs and
    dequantized weights rounded to 8 significant bits), the export in fp32 from the same dequantized
    weights (random-init spec: the `dequantized` base). With the 4-bit layers switched to fp32 compute the
    two must agree to fp32 rounding (atol 1e-4: the merge itself is exact); in bf16 compute to bf16's
    rounding through 4 layers (atol 0.02; measured 0.003 on logits of std ~0.2), while the adapters move
    the logits far more (asserted > 0.2; measured 2), so an export without them fails.
    """
    from transformers import LlavaForConditionalGeneration

    from llava_lightning.cli import main

    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)
    common = [
        "-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"), "--model.stage=qlora",
        "--model.lora.r=8", "--model.lora.alpha=16", "--model.optim.lr=5e-3", "--model.optim.warmup_ratio=0",
        "--data.batch_size=4", "--data.num_workers=0", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1", "--trainer.max_epochs=-1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}/runs",
        "--trainer.logger.name=q", "--trainer.logger.version=0",
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps=6"])
    run = tmp_path / "runs" / "q" / "version_0"
    losses = _train_losses(run / "metrics.csv")
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    (ckpt,) = glob.glob(f"{run}/checkpoints/last.ckpt")
    first = torch.load(ckpt, weights_only=True)

    main(["fit", *common, "--trainer.max_steps=8", f"--ckpt_path={ckpt}"])
    resumed = torch.load(ckpt, weights_only=True)
    assert first["global_step"] == 6 and resumed["global_step"] == 8
    packed = [k for k in first["state_dict"] if k.endswith("base_layer.weight")]
    assert packed and all(torch.equal(first["state_dict"][k], resumed["state_dict"][k]) for k in packed)
    lora = [k for k in first["state_dict"] if "lora_B" in k]
    assert any(not torch.equal(first["state_dict"][k], resumed["state_dict"][k]) for k in lora)

    capsys.readouterr()
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "hf")])
    assert "adapters merged into the dequantized base weights" in capsys.readouterr().out  # random init
    adapted = LlavaLitModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).model.eval()
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, pixels = _inputs(adapted)
    with torch.no_grad():
        exported = theirs(input_ids=ids, pixel_values=pixels).logits
        bf16 = adapted(ids, pixel_values=pixels).logits
        with adapted.language_model.disable_adapter():
            no_adapters = adapted(ids, pixel_values=pixels).logits
        for m in adapted.modules():
            if quantization.is_4bit(m):
                m.compute_dtype = torch.float32
        fp32 = adapted(ids, pixel_values=pixels).logits
    torch.testing.assert_close(exported, fp32, rtol=0, atol=1e-4)
    torch.testing.assert_close(exported, bf16, rtol=0, atol=0.02)
    assert (exported - no_adapters).abs().max() > 0.2


def _llama_folder(path, seed):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llava_lightning.model.presets import TINY_LLAMA

    cfg = dict(TINY_LLAMA)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(path)
    return path


@needs_4bit
def test_merge_prefers_the_original_base_weights_of_a_folder_spec(tmp_path):
    """A spec that loads its LLM from a folder: the adapters merge into the folder's own weights (exact:
    W + scaling * B @ A), not into their 4-bit rounding; a folder whose weights changed since is not
    taken for the original (auto falls back to dequantized, `original` refuses, both saying why)."""
    from llava_lightning.model.presets import get_preset
    from llava_lightning.training.qlora_merge import merge_qlora

    spec = get_preset("tiny")
    spec.language.name, spec.language.config = str(_llama_folder(tmp_path / "llm", seed=0)), None

    def adapted():
        lit = LlavaLitModule(spec=spec, stage="qlora", lora=SMALL_LORA)
        torch.manual_seed(2)
        for layer in _lora_layers(lit.model):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
        return lit.model

    model = adapted()
    q_proj = model.language_model.get_base_model().model.layers[1].self_attn.q_proj
    delta = q_proj.get_delta_weight("default")
    assert merge_qlora(model, spec, "auto") == "original"
    from safetensors.torch import load_file

    folder = load_file(tmp_path / "llm" / "model.safetensors")
    merged = model.language_model.model.layers[1].self_attn.q_proj
    assert type(merged) is torch.nn.Linear and not hasattr(model.language_model, "peft_config")
    torch.testing.assert_close(merged.weight, folder["model.layers.1.self_attn.q_proj.weight"] + delta)

    first, second = adapted(), adapted()
    _llama_folder(tmp_path / "llm", seed=1)  # the folder now holds other weights
    with pytest.raises(ValueError, match="not what the run quantized"):
        merge_qlora(first, spec, "original")
    assert merge_qlora(second, spec, "auto") == "dequantized"


@needs_4bit
def test_vision_8bit_tower_is_frozen_restored_exactly_and_expanded_on_export(tmp_path):
    """`vision_8bit`: the tower's linears in int8 (row-wise absmax scales), restored exactly from a state
    dict, expanded on export to within int8 rounding of the float weights: half a step (row absmax / 254),
    plus the fp16 rounding bitsandbytes applies first (measured 1.09 x half a step: bound 1.15 x)."""
    import bitsandbytes as bnb

    from llava_lightning.training.qlora_merge import merge_qlora

    if quantization.kernel_problem("8bit", "cpu") is not None:
        pytest.skip(quantization.kernel_problem("8bit", "cpu"))
    torch.manual_seed(0)
    float_tower = LlavaLitModule(preset="tiny", stage="lora", lora=SMALL_LORA).model.vision_tower
    torch.manual_seed(0)  # the same build: the same tower weights before quantization
    lit = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA, qlora=QLoraConfig(vision_8bit=True))
    tower = lit.model.vision_tower
    int8 = {n: m for n, m in tower.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert len(int8) == 6 * tower.config.num_hidden_layers  # q, k, v, out, fc1, fc2
    assert not any(p.requires_grad for p in tower.parameters())

    state = lit.state_dict()
    torch.manual_seed(1)
    other = LlavaLitModule(preset="tiny", stage="qlora", lora=SMALL_LORA, qlora=QLoraConfig(vision_8bit=True))
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())

    merge_qlora(lit.model, lit.spec, "auto")
    for name in int8:
        expanded, original = tower.get_submodule(name).weight, float_tower.get_submodule(name).weight
        assert type(tower.get_submodule(name)) is torch.nn.Linear
        half_step = original.abs().amax(dim=1, keepdim=True) / 254
        assert ((expanded - original).abs() <= half_step * 1.15).all(), name
        assert not torch.equal(expanded, original)  # it is the rounded weight, not the float one


def test_vision_8bit_with_unfrozen_vision_blocks_is_refused():
    with pytest.raises(ValueError, match="unfreeze_vision_blocks"):
        LlavaLitModule(
            preset="tiny", stage="qlora", unfreeze_vision_blocks=1, qlora=QLoraConfig(vision_8bit=True)
        )
