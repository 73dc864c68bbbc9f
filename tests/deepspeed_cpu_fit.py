"""One optimizer step of the tiny model, for tests/test_deepspeed.py: plain on one process, or under
`LlavaDeepSpeedStrategy` on CPU processes (DeepSpeed's CPU accelerator, gloo). Writes the parameter
change of an SGD step with lr 1 (minus the gradient) of rank 0 to OUT, the trained parameters after
the step to OUT.after and, under DeepSpeed, the checkpoint folder OUT.ckpt.

    python tests/deepspeed_cpu_fit.py OUT SHAPES_DIR plain|zero2|zero3|zero3-sharded DEVICES BATCH_SIZE ACCUMULATE

`zero3-sharded` saves the plain build's weights (model folders + projector artifact) and builds from
them with `sharded_init=True`, under zero.Init; `zero3-pretrained` does the same from one llava-hf folder
(`pretrained`, as a released checkpoint is loaded).

Lightning's DeepSpeedStrategy refuses anything but CUDA; `CPUDeepSpeed` skips those checks only.
"""

import contextlib
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from llava_lightning.data import LlavaDataModule, SourceConfig  # noqa: E402
from llava_lightning.module import LlavaLitModule  # noqa: E402
from llava_lightning.training.deepspeed import LlavaDeepSpeedStrategy  # noqa: E402


class CPUDeepSpeed(LlavaDeepSpeedStrategy):
    @property
    def root_device(self):
        return torch.device("cpu", 0)  # DeepSpeed wants a device index

    def setup_environment(self):
        from lightning.pytorch.strategies import DDPStrategy

        DDPStrategy.setup_environment(self)  # without DeepSpeedStrategy's CUDA check

    def setup_distributed(self):
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class SGDLit(LlavaLitModule):
    def configure_optimizers(self):  # the parameter change is minus the gradient
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)


def _saved(lit, root):
    """A spec naming folders that hold `lit`'s vision tower and language model (as hub names would)."""
    from llava_lightning.model import LanguageSpec, LlavaSpec, VisionSpec

    model = lit.model
    model.vision_tower.hf_model.save_pretrained(f"{root}/vision")
    model.language_model.save_pretrained(f"{root}/lm")
    model.tokenizer.save_pretrained(f"{root}/lm")
    tower = model.vision_tower
    return LlavaSpec(
        vision=VisionSpec(name=f"{root}/vision", image_mean=tower.image_mean, image_std=tower.image_std),
        projector=model.projector_type,
        language=LanguageSpec(name=f"{root}/lm"),
    )


def main(out, shapes, mode, devices, batch_size, accumulate):
    torch.manual_seed(0)
    lit = SGDLit(preset="tiny", stage="finetune")
    before = {n: p.detach().clone() for n, p in lit.named_parameters() if p.requires_grad}
    if mode.endswith("-sharded"):
        # The same weights, loaded the way a real run loads them (from_pretrained by path, the projector
        # from an artifact), built under zero.Init in configure_model instead (sharded_init).
        lit = SGDLit(spec=_saved(lit, os.path.dirname(out)), stage="finetune", sharded_init=True,
                     init_projector=str(lit.save_projector(f"{out}.projector.safetensors")))  # fmt: skip
        mode = mode.removesuffix("-sharded")
    elif mode.endswith("-pretrained"):
        folder = f"{os.path.dirname(out)}/llava-hf"
        lit.model.save_hf(folder, template="vicuna_v1", image_aspect="pad")
        lit = SGDLit(pretrained=folder, stage="finetune", sharded_init=True)
        mode = mode.removesuffix("-pretrained")
    source = SourceConfig(
        kind="instruct", path=f"{shapes}/instruct/llava_instruct.json", image_root=f"{shapes}/instruct"
    )
    dm = LlavaDataModule(train=[source], template="vicuna_v1", batch_size=batch_size, num_workers=0)
    stage = {"plain": 0, "zero2": 2, "zero3": 3}[mode]
    strategy = "auto"
    if stage:
        strategy = CPUDeepSpeed(
            stage=stage, process_group_backend="gloo", logging_batch_size_per_gpu=batch_size
        )
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, precision="32-true", max_steps=1,
        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=os.path.dirname(out),
    )  # fmt: skip
    trainer.fit(lit, datamodule=dm)
    if lit.sharded_init:  # built in configure_model, under zero.Init, with transformers told of ZeRO-3
        assert hasattr(lit, "_hf_deepspeed_config")
    params = [p for n, p in lit.named_parameters() if n in before]
    if stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)  # ZeRO-3 keeps 1/N of each on every rank
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        delta = {n: before[n] - p.detach() for n, p in lit.named_parameters() if n in before}
        after = {n: p.detach().clone() for n, p in lit.named_parameters() if n in before}
    if stage:  # a DeepSpeed checkpoint folder (one shard per rank) for the export test
        trainer.save_checkpoint(f"{out}.ckpt")
    if trainer.global_rank == 0:
        torch.save(delta, out)
        torch.save(after, f"{out}.after")


if __name__ == "__main__":
    out, shapes, mode, devices, batch_size, accumulate = sys.argv[1:7]
    main(out, shapes, mode, int(devices), int(batch_size), int(accumulate))
