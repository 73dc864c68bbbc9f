"""`--model.pretrained`: starting from a released llava-hf checkpoint (here a tiny folder written by
transformers alone), in every stage, through the CLI, and back out through `export`."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_lightning import LlavaModel
from llava_lightning.cli import main
from llava_lightning.model.pretrained import SETTINGS_FILE, resolve_settings, trained_with, write_settings
from llava_lightning.module import LlavaLitModule
from llava_lightning.training.stages import components

CONF = REPO / "conf"


def _image(seed=0, w=100, h=80):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _processor_inputs(folder, padding_side="right"):
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = padding_side
    prompts = [
        "USER: <image>\nWhat colour is the circle? ASSISTANT:",
        "USER: <image>\nDescribe it. ASSISTANT: A",
    ]
    return processor(images=[_image(0), _image(1, 60, 90)], text=prompts, return_tensors="pt", padding=True)


def test_our_model_from_a_transformers_written_folder_has_transformers_logits(hf_llava_dir):
    theirs = LlavaForConditionalGeneration.from_pretrained(hf_llava_dir).eval()
    lit = LlavaLitModule(pretrained=str(hf_llava_dir), template="vicuna_v1", stage="finetune")
    ours = lit.model.eval()
    inputs = _processor_inputs(hf_llava_dir)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = theirs(**inputs, labels=labels)
        got = ours(**inputs, labels=labels)
    # fp32, the same weights and kernels: stated tolerance 1e-4.
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-4)
    # The image settings the data module is given come from the folder's processor.
    assert ours.vision_tower.image_size == 96 and ours.vision_tower.num_tokens == 9
    assert ours.vision_tower.image_mean == pytest.approx(
        AutoProcessor.from_pretrained(hf_llava_dir).image_processor.image_mean
    )


TRAINS = {
    "align": {"multi_modal_projector"},
    "finetune": {"multi_modal_projector", "language_model"},
    "full": {"multi_modal_projector", "language_model", "vision_tower"},
    "lora": {"multi_modal_projector", "language_model"},
}


@pytest.mark.parametrize("stage", sorted(TRAINS))
def test_every_stage_trains_from_pretrained_weights(hf_llava_dir, stage):
    reference = LlavaModel.from_hf(hf_llava_dir).state_dict()
    lit = LlavaLitModule(pretrained=str(hf_llava_dir), template="vicuna_v1", stage=stage)
    model = lit.model
    trains = {
        name for name, part in components(model).items() if any(p.requires_grad for p in part.parameters())
    }
    assert trains == TRAINS[stage]
    if stage == "lora":  # adapters on the LLM, its own weights frozen
        lm_trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
        assert lm_trainable and all("lora_" in n for n in lm_trainable)
    # Before training, every weight is the folder's (peft's wrapper renames the LLM's keys).
    state = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in model.state_dict().items()
    }
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    # One optimizer step moves exactly the trainable parameters.
    n = model.vision_tower.num_tokens
    ids = torch.tensor([[1, 5] + [model.image_token_id] * n + [7, 8, 9, 10]])
    pixels = torch.randint(0, 255, (1, 3, 96, 96), dtype=torch.uint8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    lit.train()
    model(ids, pixel_values=pixels, labels=ids).loss.backward()
    optimizer.step()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved and moved <= {k for k, v in model.named_parameters() if v.requires_grad}
    assert any(k.startswith("multi_modal_projector") for k in moved)


def test_a_folder_that_does_not_say_its_template_needs_one(hf_llava_dir):
    with pytest.raises(ValueError, match="--model.template"):
        LlavaLitModule(pretrained=str(hf_llava_dir), stage="align")
    with pytest.raises(ValueError, match="not both"):
        LlavaLitModule(pretrained=str(hf_llava_dir), preset="tiny")


def test_released_llava_hf_names_give_their_recipe_offline():
    # HF_HUB_OFFLINE (conftest): the settings file cannot be fetched, so the known recipe decides.
    assert resolve_settings("llava-hf/llava-1.5-7b-hf", None, None) == ("vicuna_v1", "pad")
    assert resolve_settings("llava-hf/llava-1.5-7b-hf", "llava_v1", "square") == ("llava_v1", "square")
    assert trained_with("llava-hf/llava-v1.6-vicuna-13b-hf").template == "vicuna_v1"
    assert trained_with("someone/other-llava").template is None


def test_fit_from_pretrained_through_the_cli_then_export_loads_in_transformers(
    hf_llava_dir, shapes_dir, tmp_path, monkeypatch
):
    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    monkeypatch.chdir(tmp_path)  # tiny.yaml names data/shapes relative to the working directory
    main(["fit", "-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"),
          "--model.preset=null", f"--model.pretrained={hf_llava_dir}", "--model.template=vicuna_v1",
          "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
          f"--trainer.logger.init_args.save_dir={tmp_path}/runs", "--trainer.logger.init_args.name=ft"])  # fmt: skip
    (ckpt,) = glob.glob(f"{tmp_path}/runs/ft/version_0/checkpoints/last.ckpt")
    main(["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / SETTINGS_FILE).read_text()) == {
        "template": "vicuna_v1",
        "image_aspect": "pad",
    }

    trained = LlavaLitModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).model.eval()
    start = LlavaModel.from_hf(hf_llava_dir)
    assert not torch.equal(
        trained.multi_modal_projector.linear_1.weight, start.multi_modal_projector.linear_1.weight
    )
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    inputs = _processor_inputs(tmp_path / "hf", padding_side="left")
    with torch.no_grad():
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(
            trained(**inputs).logits[mask], theirs(**inputs).logits[mask], rtol=0, atol=1e-4
        )
        # Greedy, 4 tokens past the trained model's immediate "</s>" (an end id it never produces).
        never = trained.language_model.config.vocab_size - 1
        generated = theirs.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=never)
        ours = trained.generate_ids(
            inputs["input_ids"],
            inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            max_new_tokens=4,
            eos_token_ids=never,
        )
    assert ours.shape == (2, 4)
    assert generated[:, inputs["input_ids"].shape[1] :].tolist() == ours.tolist()
    # The exported folder names its template: starting from it needs no --model.template.
    again = LlavaLitModule(pretrained=str(tmp_path / "hf"), stage="lora")
    assert (again.template, again.image_aspect) == ("vicuna_v1", "pad")


def test_finetune_lora_yaml_trains_lora_from_a_pretrained_folder(
    hf_llava_dir, shapes_dir, tmp_path, monkeypatch
):
    """conf/finetune_lora.yaml as the README uses it, with the tiny folder in place of llava-1.5-7b-hf and the
    synthetic instructions as "my data"; CPU and fp32 instead of the GPU's bf16. The copy of the folder
    says its recipe as the known release does (template vicuna_v1, image aspect pad)."""
    monkeypatch.chdir(tmp_path)
    released = shutil.copytree(hf_llava_dir, tmp_path / "released")
    write_settings(released, "vicuna_v1", "pad")
    data = f"[{{kind: instruct, path: {shapes_dir}/instruct/llava_instruct.json, image_root: {shapes_dir}/instruct}}]"
    cli = main(["fit", "-c", str(CONF / "finetune_lora.yaml"), f"--model.pretrained={released}",
                f"--data.train={data}", "--data.num_workers=0", "--data.batch_size=2", "--trainer.accumulate_grad_batches=1",
                "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                "--model.gradient_checkpointing=false", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    lit = cli.model
    assert (lit.stage, lit.template, lit.image_aspect) == ("lora", "vicuna_v1", "pad")
    assert cli.datamodule.template == "vicuna_v1" and cli.datamodule.image_aspect == "pad"
    assert lit.lora_config.r == 128 and lit.optim.projector_lr == 2e-5
    assert cli.trainer.global_step == 2


@pytest.mark.skipif(
    __import__("llava_lightning.training.quantization", fromlist=["x"]).kernel_problem("4bit", "cpu")
    is not None,
    reason="no bitsandbytes 4-bit kernels on the CPU (the qlora extra)",
)
def test_qlora_from_pretrained_merges_into_the_folders_own_weights(hf_llava_dir):
    """Stage qlora from a llava-hf folder: the LLM's linears are 4-bit NF4 of the folder's weights, and the
    export merges the adapters into the folder's un-quantized weights (W + scaling * B @ A, exact)."""
    from llava_lightning.training.qlora_merge import merge_qlora
    from llava_lightning.training.settings import LoraConfig

    lit = LlavaLitModule(
        pretrained=str(hf_llava_dir),
        template="vicuna_v1",
        stage="qlora",
        lora=LoraConfig(r=8, alpha=16, dropout=0.0),
    )
    model = lit.model
    torch.manual_seed(2)
    for module in model.language_model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    q_proj = model.language_model.get_base_model().model.layers[1].self_attn.q_proj
    delta = q_proj.get_delta_weight("default")
    assert merge_qlora(model, lit.spec, "auto", lit.pretrained) == "original"
    folder = LlavaModel.from_hf(hf_llava_dir).language_model.model.layers[1].self_attn.q_proj.weight
    merged = model.language_model.model.layers[1].self_attn.q_proj
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged.weight, folder + delta)
