"""Benchmark: caption-shard loader throughput against a per-sample LLaVA-style baseline.

Both read the same generated webdataset shards of 640x480 JPEGs with the same tar reader and
DataLoader settings; they differ in what each sample costs. Ours: `decode_image` (draft decoding
where it pays), `ImageTransform.to_uint8` (CLIP `square`; normalization happens on the model's device), turn-by-turn `plain` encoding, `LlavaCollator`.
Baseline, as LLaVA's `LazySupervisedDataset` does per sample: `PIL.Image.open(...).convert("RGB")`,
`CLIPImageProcessor.preprocess`, a tokenizer call, and `pad_sequence` collation. Settings are
LLaVA-1.5's: 336 px, CLIP mean/std, 576 image tokens.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, IterableDataset

from ..data.captions import CaptionShards
from ..data.collate import LlavaCollator
from ..data.image import ImageTransform
from ..data.sample import SKIP, SampleEncoder
from ..model.language_model import add_image_token
from ..model.tiny_tokenizer import build_tiny_tokenizer
from ..model.vision_tower import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SIZE, TOKENS = 336, 576


def write_shards(root: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    """Shards of 640x480 JPEG photos-like noise images with captions; returns the brace URL."""
    rng = np.random.default_rng(seed)
    n = 0
    for s in range(shards):
        with tarfile.open(root / f"bench-{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((640, 480), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("txt", f"a photo number {n} of a red circle".encode()),
                ):
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return str(root / f"bench-{{00000..{shards - 1:05d}}}.tar")


class BaselineShards(IterableDataset):
    """LLaVA-style per-sample processing over the same shards (same tar reader and splitting)."""

    def __init__(self, shards: CaptionShards, tokenizer):
        from transformers import CLIPImageProcessor

        self.shards = shards
        self.tokenizer = tokenizer
        self.processor = CLIPImageProcessor(
            size={"shortest_edge": SIZE},
            crop_size={"height": SIZE, "width": SIZE},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        )
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")

    def __iter__(self):
        from ..data.splitting import rank_and_world, worker_and_count

        rank, world = rank_and_world()
        worker, workers = worker_and_count()
        for raw in self.shards.raw_samples(rank, world, worker, workers):
            if SKIP not in raw:
                image = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
                pixels = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
                caption = raw["txt"].decode()
                ids = self.tokenizer(caption + "\n")["input_ids"]
                ids = torch.tensor([ids[0]] + [self.image_id] * TOKENS + ids[1:])
                labels = ids.clone()
                labels[: 1 + TOKENS] = -100
                yield {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def baseline_collate(samples):
    return {
        "input_ids": pad_sequence([s["input_ids"] for s in samples], batch_first=True, padding_value=0),
        "labels": pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=-100),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
    }


def throughput(dataset, collate, workers: int, batch_size: int = 16) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["input_ids"])
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    tokenizer = build_tiny_tokenizer("llama")
    add_image_token(tokenizer)
    transform = ImageTransform(SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect="square")
    encoder = SampleEncoder(
        "plain", tokenizer, transform, num_image_tokens=TOKENS, max_length=2048, uint8_pixels=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), args.shards, args.per_shard)
        ours = CaptionShards(urls, encoder, shuffle_shards=False, shuffle_buffer=0)
        float_encoder = SampleEncoder("plain", tokenizer, transform, num_image_tokens=TOKENS, max_length=2048)
        ours_float = CaptionShards(urls, float_encoder, shuffle_shards=False, shuffle_buffer=0)
        baseline = BaselineShards(ours, tokenizer)
        for workers in args.workers:
            theirs = throughput(baseline, baseline_collate, workers)
            mine = throughput(ours, LlavaCollator(pad_token_id=0), workers)
            mine_float = throughput(ours_float, LlavaCollator(pad_token_id=0), workers)
            print(
                f"[loader] caption shards, 640x480 JPEG -> {SIZE}px, {workers} worker(s): "
                f"ours {mine:.1f} samples/s (uint8, normalized on the model's device), "
                f"ours {mine_float:.1f} samples/s (float32 from workers), "
                f"LLaVA-style baseline {theirs:.1f} samples/s; "
                f"ratio {mine / theirs:.2f} / {mine_float / theirs:.2f} (goal >= 1.5)",
                flush=True,
            )


if __name__ == "__main__":
    main()
