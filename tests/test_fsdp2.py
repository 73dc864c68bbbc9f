"""FSDP2 on CPU: 2 processes (gloo) through the real CLI train the tiny model with the losses of one
process on the same global batch."""

import csv
import os
import subprocess
import sys

import pytest
from conftest import REPO

CONF = REPO / "conf"
INSTRUCT = (
    "[{kind: instruct, path: data/shapes/instruct/llava_instruct.json, image_root: data/shapes/instruct}]"
)


def _fit(tmp_path, name: str, devices: int, batch_size: int, *extra: str) -> list[float]:
    """Run stage 2 of the tiny recipe for 4 steps; the logged per-step train/loss (a global token mean)."""
    cmd = [
        sys.executable, "-m", "llava_lightning", "fit", "-c", str(CONF / "stage2.yaml"), "-c", str(CONF / "tiny.yaml"),
        f"--data.train={INSTRUCT}", "--data.num_workers=0", f"--data.batch_size={batch_size}",
        "--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1", f"--trainer.devices={devices}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}", f"--trainer.logger.name={name}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / name / "version_0" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.fixture
def workdir(shapes_dir, tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(shapes_dir, tmp_path / "data" / "shapes")
    return tmp_path


def _last_checkpoint(workdir, name):
    return [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={workdir}/{name}-ckpt", "--trainer.callbacks.filename=last",
    ]  # fmt: skip


def test_fsdp2_with_sharded_init_on_two_processes_matches_one_process_on_the_same_global_batch(workdir):
    import torch
    from safetensors.torch import load_file

    from llava_lightning.cli import main

    single = _fit(workdir, "single", 1, 4, *_last_checkpoint(workdir, "single"))
    fsdp2 = _fit(
        workdir, "fsdp2", 2, 2,
        "--trainer.strategy=llava_lightning.training.fsdp2.FSDP2Strategy",
        "--trainer.strategy.param_dtype=null", "--trainer.strategy.frozen_vision_dtype=null",
        "--model.sharded_init=true", *_last_checkpoint(workdir, "fsdp2"),
    )  # fmt: skip
    assert len(single) == len(fsdp2) == 4
    # Sharded init (meta skeleton, sharded, then rank 0's weights broadcast shard by shard) starts from
    # the one-process run's weights: same samples per step (the sampler gives rank r every 2nd index of
    # the one-process order), same token-mean loss; fp32 sums in another order drift by ~1e-6 per
    # step, we allow 1e-4 relative. Wrong or uninitialised weights anywhere would be far off.
    assert fsdp2 == pytest.approx(single, rel=1e-4)
    assert single[-1] < single[0]  # and it trains
    # `export` consolidates the sharded checkpoint folder (one .distcp per rank) into the same llava-hf
    # weights as the one-process run's file (4 Adam steps from the same init: within 1e-4 absolute).
    sharded = workdir / "fsdp2-ckpt" / "last.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2
    main(["export", f"--ckpt_path={sharded}", f"--out={workdir}/hf-fsdp2"])
    main(["export", f"--ckpt_path={workdir}/single-ckpt/last.ckpt", f"--out={workdir}/hf-single"])
    ours, reference = (
        load_file(workdir / "hf-fsdp2" / "model.safetensors"),
        load_file(workdir / "hf-single" / "model.safetensors"),
    )
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-4, msg=key)
    # `evaluate` takes the sharded folder too (consolidated as `export` does): greedy answers of the same
    # weights (within 1e-4) to the same questions, in LLaVA's answer format.
    import json

    from llava_lightning.eval.evaluate import main as evaluate

    answers = {}
    for name, ckpt in (("fsdp2", sharded), ("single", workdir / "single-ckpt" / "last.ckpt")):
        evaluate(["--task", "gqa", "--questions", str(workdir / "data/shapes/instruct/llava_instruct.json"),
                  "--image_root", str(workdir / "data/shapes/instruct"), "--ckpt_path", str(ckpt), "--limit", "4",
                  "--max_new_tokens", "4", "--device", "cpu", "--out", str(workdir / f"eval-{name}")])  # fmt: skip
        lines = (workdir / f"eval-{name}" / "answers.jsonl").read_text().splitlines()
        answers[name] = [(a["question_id"], a["prompt"], a["text"]) for a in map(json.loads, lines)]
    assert len(answers["single"]) == 4 and answers["fsdp2"] == answers["single"]


@pytest.fixture
def process_group(monkeypatch):
    import socket

    import torch.distributed as dist

    with socket.socket() as s:  # a free port; monkeypatch keeps it out of later subprocesses' env
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_fsdp2_units_dtypes_and_frozen_tower_without_optimizer_state(process_group):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.fsdp2 import shard_fsdp2

    lit = LlavaLitModule(preset="tiny", stage="finetune")
    model = lit.model
    projector_before = {k: v.clone() for k, v in model.multi_modal_projector.state_dict().items()}
    n_vision = len(model.vision_tower.blocks())
    n_llm = model.language_model.config.num_hidden_layers
    units = shard_fsdp2(model, init_device_mesh("cpu", (1,)), param_dtype=None)
    assert units == n_vision + n_llm + 2  # every block, the tower, the root
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.language_model.parameters()} == {torch.float32}
    # the projector artifact gathers the shards back into plain full tensors
    gathered = lit.projector_state()
    assert set(gathered) == set(projector_before)
    assert all(type(v) is torch.Tensor and torch.equal(v, projector_before[k]) for k, v in gathered.items())
    # configure_optimizers only sees trainable parameters: the frozen bf16 tower gets no state
    groups = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]).param_groups
    tower_ids = {id(p) for p in model.vision_tower.parameters()}
    assert not any(id(p) in tower_ids for g in groups for p in g["params"])
    # and the sharded model trains: the fp32 projector consumes the bf16 tower's features
    n = model.vision_tower.num_tokens
    ids = torch.tensor([[1, 5] + [model.image_token_id] * n + [7, 8, 9]])
    size = model.vision_tower.image_size
    pixels = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    out = model(ids, torch.ones_like(ids), pixels, labels=ids, return_logits=False)
    out.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad is not None
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_fsdp2_sharded_checkpoint_resume_gives_the_uninterrupted_losses(workdir):
    fsdp2 = [
        "--trainer.strategy=llava_lightning.training.fsdp2.FSDP2Strategy",
        "--trainer.strategy.param_dtype=null", "--trainer.strategy.frozen_vision_dtype=null",
    ]  # fmt: skip
    ckpt = [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
        f"--trainer.callbacks.dirpath={workdir}/ckpt",
    ]  # fmt: skip
    # The uninterrupted run saves a sharded checkpoint after step 2 (what a run killed after step 2
    # leaves behind); a fresh pair of processes resumes from it.
    full = _fit(workdir, "full", 2, 2, *fsdp2, *ckpt)
    saved = workdir / "ckpt" / "epoch=0-step=2.ckpt"
    assert saved.is_dir() and len(list(saved.glob("*.distcp"))) == 2  # one shard file per rank
    resumed = _fit(workdir, "resumed", 2, 2, *fsdp2, f"--ckpt_path={saved}")
    assert resumed == pytest.approx(full[2:], rel=1e-5)


def test_sharded_init_from_a_pretrained_folder_loads_its_weights_after_sharding(process_group, hf_llava_dir):
    """`--model.pretrained` with `sharded_init`: a config-only meta skeleton is sharded, then filled with
    the folder's weights (the 2-process path through ZeRO-3 is in test_deepspeed.py)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from llava_lightning import LlavaModel
    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.fsdp2 import shard_fsdp2
    from llava_lightning.training.sharded_init import materialize_sharded

    lit = LlavaLitModule(
        pretrained=str(hf_llava_dir), template="vicuna_v1", stage="finetune", sharded_init=True
    )
    assert all(p.is_meta for p in lit.model.parameters())
    shard_fsdp2(lit.model, init_device_mesh("cpu", (1,)), param_dtype=None, frozen_vision_dtype=None)
    materialize_sharded(lit.model, lit.builder.build_from_construction_rng, torch.device("cpu"))
    expected = LlavaModel.from_hf(hf_llava_dir).state_dict()
    got = {k: v.full_tensor() for k, v in lit.model.state_dict().items()}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_fsdp2_shards_and_trains_an_anyres_model(process_group):
    """LLaVA-NeXT's root-level `image_newline` is sharded with the root unit and gets its gradient, with
    images (crops of two sizes) and on a text-only batch (the blank-image path)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from llava_lightning.module import LlavaLitModule
    from llava_lightning.training.fsdp2 import shard_fsdp2

    lit = LlavaLitModule(preset="tiny-next", stage="finetune")
    model = lit.model.train()
    shard_fsdp2(model, init_device_mesh("cpu", (1,)), param_dtype=None)
    assert isinstance(model.image_newline, DTensor) and model.image_newline.requires_grad
    sizes = torch.tensor([[300, 500], [60, 60]])
    geometry = model.anyres
    ids = [1, 5]
    for h, w in sizes.tolist():
        ids += [model.image_token_id] * geometry.num_tokens(h, w) + [7]
    ids = torch.tensor([ids + [8, 9]])
    crops = sum(geometry.num_crops(h, w) for h, w in sizes.tolist())
    pixels = torch.randint(0, 256, (crops, 3, geometry.tile, geometry.tile), dtype=torch.uint8)
    labels = torch.where(ids == model.image_token_id, -100, ids)
    model(
        ids, torch.ones_like(ids), pixels, labels=labels, image_sizes=sizes, return_logits=False
    ).loss.backward()
    assert model.image_newline.grad is not None and model.image_newline.grad.full_tensor().abs().sum() > 0
    text = torch.tensor([[5, 6, 7, 8]])
    model(text, torch.ones_like(text), None, labels=text, return_logits=False).loss.backward()
