"""Streaming caption shards in img2dataset's webdataset layout (`{key}.jpg|png|webp`, `.txt`, `.json`).

Shards are named by brace-expanded lists, local paths, `pipe:` commands or fsspec URLs (`s3://`,
`gs://`, `https://`, ...). Two ways to split them over ranks and DataLoader workers, both giving
every rank the same number of samples and batches per epoch, so no rank waits for another:

- **One pass** (default): an epoch reads every sample exactly once over all ranks. Samples, not
  shards, are dealt out: the epoch's sequence of N samples (shards in a shuffled order) is cut into
  one contiguous range of `ceil(N / world)` slots per rank, the last rank's range padded with
  `padding` markers (fewer than `world` per epoch); each rank's range is cut the same way into
  whole-batch runs per worker. A worker opens only the shards its run overlaps and starts at its
  offset. This needs every shard's sample count: from `sizes.json` in the shards' folder (a JSON
  object `{"shard-00000.tar": 10000, ...}`; wids' `{"shardlist": [{"url", "nsamples"}]}` also
  works), else counted from the tar headers of local shards; remote shards without one are an error.
- **Resampled**: every worker draws shards at random (with replacement) forever, and an epoch is
  `epoch_length` samples per rank (`epoch_length * world` in all).

A corrupt image, a sample without caption, a tar that breaks off (truncated anywhere, even exactly
at a member boundary: a tar must end with its end-of-archive blocks) or a `pipe:` command that exits
with a non-zero status becomes a counted skip in its slot (`bad_shard` for the shard's faults), and the
stream goes on; in strict mode (`SampleEncoder.strict`) each raises `StrictModeError` instead. Padding
slots are never errors.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

from braceexpand import braceexpand
from torch.utils.data import IterableDataset

from .sample import PADDING, SKIP, SampleEncoder, padding
from .splitting import rank_and_world, worker_and_count, worker_range

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace-expand each entry (`shard-{00000..00009}.tar`); lists and `::`-joined strings are accepted."""
    items = urls.split("::") if isinstance(urls, str) else list(urls)
    return [u for item in items for u in braceexpand(item)]


class ShardCommandError(OSError):
    """A `pipe:` shard command exited with a non-zero status after its output was read to the end."""


class PipeStream(io.RawIOBase):
    """The output of a `pipe:` shard command, as a readable binary stream that owns the process.

    `finish()` reads what is left, waits for the command and raises `ShardCommandError` if it exited
    with a non-zero status. `close()` (also run by `with` and on garbage collection) never raises: it
    reaps the command, first terminating it (and what it started) if it still runs, since stopping
    early on purpose is no failure. The command runs in its own session so that terminating reaches
    the processes its shell started; it does not see the terminal's Ctrl-C, but its reader's
    unwinding terminates it.
    """

    def __init__(self, command: str):
        super().__init__()
        self.command = command
        self._proc = subprocess.Popen(  # noqa: S602 (the user's command)
            command, shell=True, stdout=subprocess.PIPE, start_new_session=True
        )

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._proc.stdout.read(size)

    def readinto(self, buffer) -> int:
        return self._proc.stdout.readinto(buffer)

    def finish(self) -> None:
        """Read the command's output to its end, wait for it, raise `ShardCommandError` on failure."""
        while self._proc.stdout.read(1 << 16):
            pass
        status = self._proc.wait()
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise ShardCommandError(f"shard command {self.command!r} {how}")

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._proc.stdout.close()  # a writer still running gets SIGPIPE
            if self._proc.returncode is None:  # not reaped yet (finish() reaps)
                self._signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self._proc.wait()
        finally:
            super().close()

    def _signal(self, sig: int) -> None:
        # The command's process group (its shell and what the shell started), while the shell is
        # unreaped its id cannot be reused; a group already gone is fine.
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def open_url(url: str):
    """A binary stream for a local path, `pipe:command` (a `PipeStream`), or any fsspec URL."""
    if url.startswith("pipe:"):
        return PipeStream(url[5:])
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


class _CheckedTarInfo(tarfile.TarInfo):
    """A `TarInfo` whose reader tells a tar that breaks off from one that ends.

    CPython's `TarFile.next` (3.10 to 3.13) takes an empty read (`EmptyHeaderError`), a partial block
    (`TruncatedHeaderError`) or a bad checksum (`InvalidHeaderError`) at any header position but the
    first as the end of the archive, so a tar cut at or inside a member header would silently lose
    the samples after the cut. Only an all-zero block (`EOFHeaderError`) ends a tar here; the others
    raise `ReadError` (at position 0 `TarFile` raised `ReadError` already, so opening is unchanged).
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            raise tarfile.ReadError(
                f"the tar breaks off at byte {tarfile_.offset} without its end-of-archive blocks ({err}): "
                "the file was cut short"
            ) from None


def _bad_shard(where: str, detail: str) -> dict[str, str]:
    """A `bad_shard` marker, not yet logged: `CaptionShards` passes it through its encoder's `fail`,
    which logs and counts it (or, in strict mode, raises `StrictModeError` with `detail`)."""
    return {SKIP: "bad_shard", "where": where, "detail": detail}


def _member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, field) of a tar member (`dir/000123.jpg` -> `dir/000123`, `jpg`); None for non-sample members."""
    if not member.isfile():
        return None
    path = member.name
    base = path.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:
        return None
    stem, field = base.split(".", 1)
    return path[: len(path) - len(base)] + stem, field.lower()


def iter_tar_samples(url: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples `start` .. `stop - 1` of one shard, grouped by key (consecutive members of one key).

    Samples before `start` are passed over without reading their data, and reading ends at `stop`.
    A shard that breaks off (truncated tar, one without its end-of-archive blocks, I/O error) gives a
    `bad_shard` marker in place of the sample it was reading (in place of sample 0 if it cannot be
    opened), so it yields exactly `count_samples(url)` items, and the stream goes on with the next
    shard. So does a `pipe:` command read to its end that exits with a non-zero status: the marker
    takes the last sample's place (the output may be incomplete). Stopping at `stop` terminates the
    command instead; that is no failure.
    """
    index, key, current = -1, None, {}
    try:
        with (
            open_url(url) as stream,
            tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo) as tar,
        ):
            for member in tar:
                named = _member_key(member)
                if named is None:
                    continue
                name, field = named
                if name != key:
                    if current:
                        yield current
                    index, key, current = index + 1, name, {}
                    if stop is not None and index >= stop:
                        return
                if index < start:
                    continue
                if not current:
                    current = {"__key__": key, "__url__": url}
                current[field] = tar.extractfile(member).read()
            if isinstance(stream, PipeStream):
                stream.finish()  # raises here, so that its marker replaces the last sample
    except (tarfile.TarError, OSError, EOFError) as err:
        index = max(index, 0)
        if start <= index and (stop is None or index < stop):
            yield _bad_shard(f"{url}:{key if key is not None else '#0'}", f"{type(err).__name__}: {err}")
        return
    if current:
        yield current


def local_path(url: str) -> str | None:
    """The file path of a local shard (plain path or `file://`); None for `pipe:` and remote URLs."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    return url.removeprefix("file://")


def count_samples(url: str) -> int:
    """The number of items `iter_tar_samples(url)` yields (samples, or a broken shard's samples up
    to and including its `bad_shard` marker). A local shard is scanned header by header, seeking
    over the data (cheap), with the same end-of-archive check; any other URL is read in full."""
    path = local_path(url)
    if path is None:
        return sum(1 for _ in iter_tar_samples(url))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption shard {url} does not exist")
    index, key = -1, None
    try:
        with tarfile.open(path, "r:*", tarinfo=_CheckedTarInfo) as tar:
            for member in tar:
                named = _member_key(member)
                if named is not None and named[0] != key:
                    index, key = index + 1, named[0]
    except (tarfile.TarError, OSError, EOFError):
        index = max(index, 0)  # iter_tar_samples yields its bad_shard marker here
    return index + 1


def _sizes_file(url: str) -> str | None:
    """Where the `sizes.json` of a shard lives: in the shard's folder (None for `pipe:` commands)."""
    if url.startswith("pipe:"):
        return None
    return f"{url.rsplit('/', 1)[0]}/{SIZES_FILE}" if "/" in url else SIZES_FILE


def _parse_sizes(data: Any, where: str) -> dict[str, int]:
    """`{"shard-00000.tar": 10000, ...}`, or a wids shard index (`{"shardlist": [{"url", "nsamples"}]}`)."""
    if isinstance(data, Mapping) and isinstance(data.get("shardlist"), list):
        data = {entry["url"]: entry["nsamples"] for entry in data["shardlist"]}
    if not isinstance(data, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in data.values()
    ):
        raise ValueError(f"{where}: expected a JSON object mapping shard file names to sample counts")
    return {str(k): int(v) for k, v in data.items()}


def _read_sizes(location: str) -> dict[str, int] | None:
    try:
        with open_url(location) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return _parse_sizes(data, location)


def _lookup(table: Mapping[str, int] | None, url: str) -> int | None:
    if table is None:
        return None
    if url in table:
        return table[url]
    return table.get(url.rsplit("/", 1)[-1])


def shard_sizes(urls: list[str], sizes: str | Mapping[str, int] | None = None) -> list[int]:
    """Samples per shard: from `sizes` (a JSON file / URL, or a mapping), else from the `sizes.json`
    in each shard's folder, else, for a local shard, counted by `count_samples`. Names are looked
    up as given, then by file name. A remote or `pipe:` shard without a known size is an error."""
    explicit = None
    if sizes is not None:
        explicit = _parse_sizes(sizes, "sizes") if isinstance(sizes, Mapping) else _read_sizes(sizes)
        if explicit is None:
            raise FileNotFoundError(f"sizes file {sizes} does not exist")
    tables: dict[str, dict[str, int] | None] = {}
    counts, scanned = [], 0
    for url in urls:
        n = _lookup(explicit, url)
        location = _sizes_file(url)
        if n is None and location is not None:
            if location not in tables:
                tables[location] = _read_sizes(location)
            n = _lookup(tables[location], url)
        if n is None:
            if local_path(url) is None:
                raise ValueError(
                    f"caption shard {url} has no known sample count, which the non-resampled mode needs "
                    "to give every rank the same number of samples, each read once. Write a "
                    f"{SIZES_FILE} next to the shards (a JSON object mapping shard file name to sample "
                    'count, e.g. {"shard-00000.tar": 10000}; `python data_recipes/shard_sizes.py URLS` '
                    "writes one), pass `sizes` (such a JSON file or mapping), or use `resampled: true` "
                    "with an epoch_length."
                )
            n = count_samples(url)
            scanned += 1
        counts.append(n)
    if scanned:
        log.info(
            "counted the samples of %d local shard(s); a %s next to them saves this", scanned, SIZES_FILE
        )
    return counts


def write_sizes(urls: str | list[str], out: str | None = None) -> dict[str, int]:
    """Count the samples of each shard and write `{file name: count}` as JSON to `out` (default: the
    `sizes.json` in the first shard's folder, merged with what it holds); returns the written table."""
    urls = expand_urls(urls)
    out = out or _sizes_file(urls[0])
    if out is None:
        raise ValueError("pipe: shards have no folder for sizes.json: pass out=")
    table = dict(_read_sizes(out) or {})
    table.update({url.rsplit("/", 1)[-1]: count_samples(url) for url in urls})
    text = json.dumps(dict(sorted(table.items())), indent=1) + "\n"
    path = local_path(out)
    if path is None:
        import fsspec

        with fsspec.open(out, "w") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return table


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
    """Image-caption pairs from webdataset shards, encoded as a one-turn conversation.

    `len()` is the samples per rank per epoch: `ceil(N / world)` slots in the one-pass mode,
    `epoch_length` when resampled. Pass the DataLoader's `batch_size` so that workers read whole
    batches and `len(loader)` is exactly the number of batches it yields (with another batch size
    the guarantees still hold, only `len(loader)` may be off).
    """

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
        sizes: str | Mapping[str, int] | None = None,
        batch_size: int = 1,
    ):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        if resampled and not epoch_length:
            raise ValueError("resampled caption shards need epoch_length (samples per rank per epoch)")
        if epoch_length is not None and not resampled:
            raise ValueError(
                "epoch_length applies to resampled caption shards; without resampling an epoch is one "
                "pass over the shards"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.caption_prompt = caption_prompt
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.batch_size = batch_size
        self.epoch = 0
        # Samples per shard (one-pass mode only), in `urls` order.
        self.sizes = None if resampled else shard_sizes(self.urls, sizes)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards differently each epoch (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples (slots, padding included) per rank per epoch."""
        if self.resampled:
            return self.epoch_length
        return -(-sum(self.sizes) // rank_and_world()[1])

    def shard_order(self) -> list[tuple[str, int]]:
        """This epoch's (shard, size) sequence, the same on every rank: shuffled by (seed, epoch)."""
        order = list(zip(self.urls, self.sizes))
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def slots_for(self, rank: int, world: int, worker: int, workers: int) -> tuple[int, int]:
        """The worker's slots [first, last) in the epoch's sample sequence (slots >= N are padding)."""
        per_rank = -(-sum(self.sizes) // world)
        lo, hi = worker_range(per_rank, worker, workers, self.batch_size)
        return rank * per_rank + lo, rank * per_rank + hi

    def raw_samples(self, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        """The worker's raw records in order (with skip and padding markers), before shuffling."""
        if self.resampled:
            rng = random.Random(_stream_seed(self.seed, self.epoch, rank, worker, 1))
            lo, hi = worker_range(self.epoch_length, worker, workers, self.batch_size)
            n, empty = 0, 0
            while n < hi - lo:
                before = n
                for raw in iter_tar_samples(rng.choice(self.urls)):
                    yield raw
                    n += 1
                    if n == hi - lo:
                        return
                empty = empty + 1 if n == before else 0
                if empty > 10 * len(self.urls):
                    raise RuntimeError(f"resampled caption shards {self.urls[:3]}... hold no samples")
            return
        first, last = self.slots_for(rank, world, worker, workers)
        pos = 0
        for url, size in self.shard_order():
            start, stop = max(first, pos) - pos, min(last, pos + size) - pos
            if start < stop:
                yield from _shard_slots(url, size, start, stop)
            pos += size
        for slot in range(max(first, pos), last):
            yield padding(f"padding slot {slot} (rank {rank} of {world}, {pos} samples)")

    def _encode(self, raw: dict) -> dict:
        if SKIP in raw:
            # Padding evens out ranks and is never an error; a shard's fault is one (strict mode raises).
            if raw[SKIP] == PADDING:
                return raw
            return self.encoder.fail(raw[SKIP], raw["where"], raw.get("detail", ""))
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
        for raw in shuffled(self.raw_samples(rank, world, worker, workers), self.shuffle_buffer, rng):
            yield self._encode(raw)


def _shard_slots(url: str, size: int, start: int, stop: int) -> Iterator[dict]:
    """Exactly `stop - start` items: the shard's samples `start .. stop - 1`, with `bad_shard`
    markers for those a shorter shard lacks (its size in sizes.json is stale, or it broke off)."""
    n = start
    # One item past the end when it is ours to check, to warn of samples beyond the recorded size.
    for raw in iter_tar_samples(url, start, stop + 1 if stop == size else stop):
        if n == stop:
            log.warning("%s has more than its recorded %d samples; the rest are not read", url, size)
            return
        yield raw
        n += 1
    for index in range(n, stop):
        yield _bad_shard(f"{url}:#{index}", f"the shard ends before its recorded {size} samples")
