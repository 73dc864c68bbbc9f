"""Streaming caption shards in img2dataset's webdataset layout (`{key}.jpg|png|webp`, `.txt`, `.json`).

Shards are named by brace-expanded lists, local paths, `pipe:` commands or fsspec URLs (`s3://`,
`gs://`, `https://`, ...). Shards are split explicitly over ranks, then workers; with `resampled`
every worker draws shards at random forever and the epoch has a fixed length per rank, so every
rank runs the same number of steps. A corrupt image, a sample without caption or a truncated tar
becomes a counted skip; the stream goes on.
"""

from __future__ import annotations

import random
import subprocess
import tarfile
from collections.abc import Iterator
from typing import Any

from braceexpand import braceexpand
from torch.utils.data import IterableDataset

from .sample import SKIP, SampleEncoder, skip
from .splitting import quota, rank_and_world, worker_and_count

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand each entry (`shard-{00000..00009}.tar`); lists and `::`-joined strings are accepted."""
    items = urls.split("::") if isinstance(urls, str) else list(urls)
    return [u for item in items for u in braceexpand(item)]


def open_url(url: str):
    """A binary stream for a local path, `pipe:command`, or any fsspec URL."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (the user's command)
        return proc.stdout
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard grouped by key (`dir/000123.jpg` -> key `dir/000123`, field `jpg`)."""
    current: dict[str, Any] = {}
    try:
        with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                path = member.name
                base = path.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                stem, field = base.split(".", 1)
                key = path[: len(path) - len(base)] + stem
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current["__url__"] = url
                current[field.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        if current:
            yield current
            current = {}
        yield skip("bad_shard", url, f"{type(err).__name__}: {err}")
    if current:
        yield current


def _stream_seed(*parts: int) -> int:
    """A deterministic seed from integers (Python's str hash is salted per process, so no strings)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63)
    return seed


def shuffled(items: Iterator[dict], buffer: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle with a buffer of `buffer` samples (0 or 1: no shuffling)."""
    if buffer <= 1:
        yield from items
        return
    pool: list[dict] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


class CaptionShards(IterableDataset):
    """Image-caption pairs from webdataset shards, encoded as a one-turn conversation."""

    def __init__(
        self,
        urls: str | list[str],
        encoder: SampleEncoder,
        caption_prompt: str = "<image>\nDescribe the image briefly.",
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
    ):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        if resampled and not epoch_length:
            raise ValueError("resampled caption shards need epoch_length (samples per rank per epoch)")
        self.encoder = encoder
        self.caption_prompt = caption_prompt
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards differently each epoch (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        # Samples per rank per epoch, when fixed; a plain shard list has no length known in advance.
        if self.epoch_length is None:
            raise TypeError("caption shards without epoch_length have no length")
        return self.epoch_length

    def shards_for(self, rank: int, world: int, worker: int, workers: int) -> list[str]:
        """This worker's shards in the non-resampled mode: shuffled by epoch, split by rank then worker."""
        shards = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        return shards[rank::world][worker::workers]

    def _raw(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        if not self.resampled:
            for url in self.shards_for(rank, world, worker, workers):
                yield from iter_tar_samples(url)
            return
        rng = random.Random(_stream_seed(self.seed, self.epoch, rank, worker, 1))
        while True:
            yield from iter_tar_samples(rng.choice(self.urls))

    def _encode(self, raw: dict) -> dict:
        if SKIP in raw:
            return raw
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        image_field = next((f for f in IMAGE_EXTS if f in raw), None)
        if image_field is None or "txt" not in raw:
            return self.encoder.fail(
                "malformed_record", where, "sample needs an image (jpg/png/webp) and a txt caption"
            )
        caption = raw["txt"].decode("utf-8", errors="replace").strip()
        conversation = [{"from": "human", "value": self.caption_prompt}, {"from": "gpt", "value": caption}]
        return self.encoder(conversation, [raw[image_field]], where)

    def __iter__(self) -> Iterator[dict]:
        rank, world = rank_and_world()
        worker, workers = worker_and_count()
        rng = random.Random(_stream_seed(self.seed, self.epoch, rank, worker, 2))
        stream = shuffled(self._raw(rank, world, worker, workers), self.shuffle_buffer, rng)
        limit = quota(self.epoch_length, worker, workers) if self.epoch_length else None
        for n, raw in enumerate(stream):
            if limit is not None and n >= limit:
                return
            yield self._encode(raw)
