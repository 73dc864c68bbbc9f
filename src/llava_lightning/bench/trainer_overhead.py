"""Benchmark: Lightning's overhead on the tiny recipe: `Trainer.fit` against a bare PyTorch loop.

Both train the same `LlavaLitModule` (tiny preset, stage 2 `finetune`, same initial weights) on the
same pre-collated batches of the synthetic instruction data, with the same AdamW groups, schedule
and token-normalized loss. The timed window skips the first steps (warm-up) in both.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from ..data import LlavaDataModule, SourceConfig
from ..data.synthetic import generate
from ..module import LlavaLitModule, OptimConfig


def _batches(lit: LlavaLitModule, n: int, batch_size: int) -> list[dict]:
    root = Path(tempfile.mkdtemp())
    generate(root, seed=0, n_captions=16, n_instruct=n * batch_size, n_eval=4, n_mc_train=4)
    dm = LlavaDataModule(
        train=[SourceConfig(kind="instruct", path=str(root / "instruct/llava_instruct.json"), image_root=str(root / "instruct"))],
        template="vicuna_v1", batch_size=batch_size, num_workers=0,
    )  # fmt: skip
    dm.connect(lit.model)
    return [b for _, b in zip(range(n), dm.train_dataloader())]


class _Clock(Callback):
    def __init__(self, skip: int):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def bare_loop(lit: LlavaLitModule, batches: list[dict], skip: int) -> float:
    """The same step by hand: forward, summed loss, backward, gradient / token count, clip, AdamW, schedule."""
    from ..training.params import param_groups
    from ..training.schedule import warmup_cosine

    o = lit.optim
    groups = param_groups(
        {"multi_modal_projector": (lit.model.multi_modal_projector, o.projector_lr or o.lr),
         "language_model": (lit.model.language_model, o.lr)},
        o.weight_decay,
    )  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    sched = warmup_cosine(opt, len(batches), o.warmup_ratio)
    lit.train()
    for i, batch in enumerate(batches):
        if i == skip:
            start = time.perf_counter()
        out = lit(batch)
        out.loss_sum.backward()
        scale = 1.0 / out.num_supervised.clamp(min=1)
        for p in lit.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        torch.nn.utils.clip_grad_norm_([p for p in lit.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def with_trainer(lit: LlavaLitModule, batches: list[dict], skip: int) -> float:
    clock = _Clock(skip)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(lit, train_dataloaders=DataLoader(batches, batch_size=None))
    return clock.end - clock.start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = LlavaLitModule(preset="tiny", stage="finetune", optim=OptimConfig(lr=1e-3))
    batches = _batches(base, args.steps, args.batch)
    bare = bare_loop(copy.deepcopy(base), batches, args.skip)
    lightning = with_trainer(copy.deepcopy(base), batches, args.skip)
    n = args.steps - args.skip
    print(
        f"[trainer] tiny recipe, batch {args.batch}, {n} timed steps: Trainer {lightning / n * 1e3:.0f} ms/step, "
        f"bare loop {bare / n * 1e3:.0f} ms/step, overhead {(lightning / bare - 1) * 100:+.1f}% (goal <= 5%)",
        flush=True,
    )


if __name__ == "__main__":
    main()
