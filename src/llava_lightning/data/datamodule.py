"""`LlavaDataModule`: the training and validation data of one stage, configured from YAML.

Sources are caption shards (stage 1) and instruction JSON files (stage 2), mixed by weight when
there are several. Tokenizer, image size / mean / std and the number of image tokens come from the
model (`connect(model)`, done automatically in `setup` under a Trainer), never repeated in YAML.
Samples seen and skipped per reason are counted from the batches and reported per epoch; a run
whose skips exceed `max_skip_ratio` of a window of samples stops, naming the reasons. A source
whose local files do not exist fails at `setup`, before any step.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..anyres import AnyresGeometry
from .anyres_image import AnyresTransform
from .captions import CaptionShards, expand_urls, local_path
from .collate import LlavaCollator
from .image import ImageTransform, TowerImageSpec
from .instruct import InstructionDataset
from .length_grouping import LengthGrouping
from .mixture import WeightedMixture
from .prompts import PromptDataset, collate_prompts
from .sample import PADDING, SampleEncoder
from .sampler import EpochSampler, ResumableDataLoader
from .step_tokens import StepTokenLoader
from .templates import IMAGE

log = logging.getLogger(__name__)


class TowerDataSpec(TowerImageSpec, Protocol):
    """What the data reads from a vision tower: the image transform's size, mean and std, and the number
    of image-token ids per image. The model's `VisionTower` fits without naming it (data/ does not
    import the model)."""

    @property
    def num_tokens(self) -> int:
        """Feature vectors (image-token ids) per image."""
        ...


@dataclass
class ImageSettings:
    """What the data needs from the model's vision tower (filled by the CLI link, not by hand)."""

    size: int
    """Square input size in pixels."""
    mean: list[float]
    """Normalization mean (RGB)."""
    std: list[float]
    """Normalization std (RGB)."""
    num_image_tokens: int
    """Image-token ids per image (anyres: per crop, a square grid)."""
    image_grid_pinpoints: list[list[int]] | None = None
    """The model's anyres pinpoints (LLaVA-NeXT: each image tiled into crops, its own token count); None:
    LLaVA-1.5 (`image_aspect` applies)."""

    @classmethod
    def from_tower(
        cls, tower: TowerDataSpec, image_grid_pinpoints: list[list[int]] | None = None
    ) -> ImageSettings:
        """The settings a vision tower reports (and the model's anyres pinpoints, if any)."""
        pins = [list(map(int, p)) for p in image_grid_pinpoints] if image_grid_pinpoints else None
        return cls(tower.image_size, list(tower.image_mean), list(tower.image_std), tower.num_tokens, pins)

    def anyres(self) -> AnyresGeometry | None:
        """The crop geometry the settings describe, or None (LLaVA-1.5)."""
        if not self.image_grid_pinpoints:
            return None
        grid = math.isqrt(self.num_image_tokens)
        return AnyresGeometry(self.size, grid, self.image_grid_pinpoints)


@dataclass
class SourceConfig:
    """One data source of a stage."""

    kind: Literal["captions", "instruct"]
    """`captions`: webdataset caption shards; `instruct`: a LLaVA-format JSON file."""
    path: str
    """Shard URL(s) with brace expansion (captions) or the JSON file (instruct)."""
    image_root: str | None = None
    """Folder the JSON's image paths are relative to (instruct)."""
    weight: float = 1.0
    """Sampling weight when a stage mixes several sources."""
    resampled: bool = False
    """Captions: draw shards at random with replacement (needs epoch_length). Without it an epoch reads
    every sample exactly once over all ranks (shard sizes from sizes.json); either way every rank
    runs the same number of steps."""
    epoch_length: int | None = None
    """Captions: samples per rank per epoch with resampled (epoch_length * world in all)."""
    sizes: str | None = None
    """Captions: JSON file of samples per shard (`{"shard-00000.tar": 10000, ...}`); default: the
    sizes.json beside the shards, else local shards are counted."""
    follow_links: bool = False
    """Instruct: accept symlinks inside image_root that lead outside it (a trusted folder linking to image
    stores elsewhere); `../` and absolute image paths are refused either way."""


def missing_files(source: SourceConfig) -> list[str]:
    """The local files and folders a source names that do not exist (remote and `pipe:` shards are not
    checked: they are counted as `bad_shard` skips when they fail)."""
    if source.kind == "instruct":
        missing = [] if os.path.isfile(source.path) else [source.path]
        if source.image_root is not None and not os.path.isdir(source.image_root):
            missing.append(f"{source.image_root}/ (image_root)")
        return missing
    local = (local_path(url) for url in expand_urls(source.path))
    return [path for path in local if path is not None and not os.path.isfile(path)]


class DataSkipError(RuntimeError):
    """Too many samples of a window were skipped: the run stops instead of training on what is left."""


# Checkpoints store the data module's hyperparameters; allow these under torch.load(weights_only=True).
torch.serialization.add_safe_globals([SourceConfig, ImageSettings])


def _for_stage(sources, stage: str | None, what: str) -> list[SourceConfig]:
    if not isinstance(sources, dict):
        return list(sources)
    if stage not in sources:
        raise ValueError(
            f"data.{what} is keyed by stage ({', '.join(sources)}) but the model's stage is {stage!r}"
        )
    return list(sources[stage])


class LlavaDataModule(L.LightningDataModule):
    """Caption shards and instruction JSON for LLaVA training, with skip accounting."""

    def __init__(
        self,
        train: list[SourceConfig] | dict[str, list[SourceConfig]],
        val: list[SourceConfig] | dict[str, list[SourceConfig]] | None = None,
        predict: SourceConfig | None = None,
        test: list[SourceConfig] | dict[str, list[SourceConfig]] | None = None,
        template: str = "vicuna_v1",
        batch_size: int = 16,
        num_workers: int = 4,
        max_length: int = 2048,
        image_aspect: Literal["square", "pad"] = "pad",
        shuffle_buffer: int = 1000,
        mixture_epoch_length: int | None = None,
        seed: int = 0,
        strict: bool = False,
        max_skip_ratio: float = 0.5,
        skip_window: int = 1000,
        missing_data_hint: str | None = None,
        uint8_pixels: bool = True,
        group_by_length: bool = False,
        group_megabatch: int = 50,
        pack_tokens: int | None = None,
        tokenizer: Any = None,
        image_settings: ImageSettings | None = None,
        stage: str | None = None,
    ):
        """
        Args:
            train: Training sources (one, or several mixed by weight), or such lists keyed by model stage
                (`align`, `finetune`, ...): one overlay (conf/tiny.yaml) then serves every stage.
            val: Validation sources (read in order, no shuffling), a list or keyed by stage like `train`.
            predict: Prompts for `predict`: a LLaVA JSON (kind instruct); each record's first human turn and
                its images are answered (write the replies with `llava_lightning.PredictionWriter`).
            test: Sources for `test` (loss, perplexity, next-token accuracy), read in order like `val`.
            template: Conversation template (plain, vicuna_v1, llava_v1, llama_2, chatml, llama3, auto); the
                CLI links it from `model.template`.
            batch_size: Samples per device per step (skipped samples make a batch smaller).
            num_workers: DataLoader worker processes per device.
            max_length: Token limit per sample; a sample whose image span or every reply is cut is skipped.
            image_aspect: `square` (CLIP resize + center crop) or `pad` (expand to square with the mean colour);
                the CLI links it from `model.image_aspect`.
            shuffle_buffer: Samples held for shuffling streamed caption shards.
            mixture_epoch_length: Samples per rank per epoch when several training sources are mixed.
            seed: Seed for shard order, shuffling and mixing.
            strict: Raise on the first bad sample instead of skipping and counting it.
            max_skip_ratio: Stop training when more than this share of a window's samples were skipped (1.0: never).
            skip_window: Samples per rank in the window `max_skip_ratio` is checked over (whole batches).
            missing_data_hint: Added to the error for missing data files: how to get them (e.g. the command
                that generates them).
            uint8_pixels: Ship uint8 pixels from workers; the model normalizes them on its device.
            group_by_length: Batch training samples of similar length, text-only and image samples apart
                (LLaVA's group_by_modality_length); one instruct training source only.
            group_megabatch: With group_by_length: steps (ranks x batch_size samples) sorted by length
                together; larger pads less, capped at a quarter of the epoch.
            pack_tokens: Pack each batch's samples into rows of at most this many tokens (first-fit decreasing,
                each sample attending only to itself) instead of padding them to the longest; >= max_length.
            tokenizer: The model's tokenizer (linked from the model by the CLI; or call `connect(model)`).
            image_settings: The model's image size / mean / std / image-token count (linked like the tokenizer).
            stage: The model's training stage (linked by the CLI); picks `train` / `val` when keyed by stage.
        """
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["tokenizer"])
        self.stage = stage
        self.train_sources = _for_stage(train, stage, "train")
        self.val_sources = _for_stage(val or [], stage, "val")
        self.test_sources = _for_stage(test or [], stage, "test")
        if predict is not None and predict.kind != "instruct":
            raise ValueError(
                f"data.predict must be a LLaVA JSON source (kind: instruct), got kind {predict.kind!r}"
            )
        self.predict_source = predict
        self.template, self.batch_size, self.num_workers = template, batch_size, num_workers
        self.max_length, self.image_aspect, self.shuffle_buffer = max_length, image_aspect, shuffle_buffer
        self.mixture_epoch_length, self.seed, self.strict = mixture_epoch_length, seed, strict
        if not 0.0 <= max_skip_ratio <= 1.0:
            raise ValueError(f"max_skip_ratio must be within [0, 1], got {max_skip_ratio}")
        if skip_window < 1:
            raise ValueError(f"skip_window must be >= 1 sample, got {skip_window}")
        self.max_skip_ratio, self.skip_window = max_skip_ratio, skip_window
        self.missing_data_hint = missing_data_hint
        self.uint8_pixels = uint8_pixels
        if group_by_length and [s.kind for s in self.train_sources] != ["instruct"]:
            kinds = ", ".join(s.kind for s in self.train_sources) or "none"
            raise ValueError(
                f"data.group_by_length needs exactly one training source of kind instruct, got: {kinds}. "
                "Caption shards stream and weighted mixtures draw on the fly, so neither can be ordered by "
                "length: set data.group_by_length false for them, or merge the instruction JSON files into one"
            )
        if group_megabatch < 1:
            raise ValueError(f"group_megabatch must be >= 1 step, got {group_megabatch}")
        self.group_by_length, self.group_megabatch = group_by_length, group_megabatch
        if pack_tokens is not None and pack_tokens < max_length:
            raise ValueError(
                f"data.pack_tokens ({pack_tokens}) must be >= data.max_length ({max_length}) so that every "
                "sample fits in a packed row: raise pack_tokens or lower max_length"
            )
        self.pack_tokens = pack_tokens
        self._window: Counter[str] = Counter()  # samples (`seen`) and skips per reason since the last check
        self._window_batches = 0
        self.encoder: SampleEncoder | None = None
        self.collator: LlavaCollator | None = None
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self._epoch: int | None = None
        self._iterables: list[IterableDataset] = []
        if tokenizer is not None and image_settings is not None:
            self._connect(tokenizer, image_settings)

    def connect(self, model: Any) -> None:
        """Take tokenizer, image settings and image-token count from a `LlavaModel`."""
        pins = getattr(model, "image_grid_pinpoints", None)
        self._connect(model.tokenizer, ImageSettings.from_tower(model.vision_tower, pins))

    def _connect(self, tokenizer: Any, settings: ImageSettings) -> None:
        anyres = settings.anyres()
        if anyres is not None:  # LLaVA-NeXT crops; image_aspect is LLaVA-1.5's and does not apply
            transform: Any = AnyresTransform(anyres, settings.mean, settings.std)
        else:
            transform = ImageTransform(settings.size, settings.mean, settings.std, aspect=self.image_aspect)
        self.encoder = SampleEncoder(
            template=self.template,
            tokenizer=tokenizer,
            transform=transform,
            num_image_tokens=settings.num_image_tokens,
            max_length=self.max_length,
            strict=self.strict,
            uint8_pixels=self.uint8_pixels,
        )
        self.collator = LlavaCollator(
            pad_token_id=tokenizer.pad_token_id,
            pack_tokens=self.pack_tokens,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
            anyres=anyres,
        )

    def setup(self, stage: str | None = None) -> None:
        self.check_files(stage)
        if self.encoder is None:
            if self.trainer is None or self.trainer.lightning_module is None:
                raise RuntimeError("LlavaDataModule needs connect(model) before use outside a Trainer")
            self.connect(self.trainer.lightning_module.model)

    _READS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}

    def check_files(self, stage: str | None = None) -> None:
        """Raise `FileNotFoundError` naming every missing local file of the sources `stage` reads
        (`fit`: train and val, `validate`, `test`, `predict`; None: all), with `missing_data_hint`."""
        groups = {
            "train": self.train_sources,
            "val": self.val_sources,
            "test": self.test_sources,
            "predict": [self.predict_source] if self.predict_source else [],
        }
        self._check_sources({what: groups[what] for what in self._READS.get(stage, tuple(groups))})

    def _check_sources(self, groups: dict[str, list[SourceConfig]]) -> None:
        problems = []
        for what, group in groups.items():
            for source in group:
                if source.kind == "instruct" and source.image_root is None and what != "predict":
                    problems.append(
                        f"data.{what} source {source.path} needs image_root (the folder its images are in)"
                    )
                missing = missing_files(source)
                if missing:
                    shown = ", ".join(missing[:3]) + (
                        f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                    )
                    problems.append(f"data.{what} source {source.path}: {len(missing)} missing ({shown})")
        if problems:
            hint = self.missing_data_hint or (
                "check the paths (relative ones are read from the working directory); data_recipes/README.md "
                "says how to prepare each dataset"
            )
            raise FileNotFoundError(
                "data sources cannot be read:\n  "
                + "\n  ".join(problems)
                + f"\n(working directory {os.getcwd()}). "
                + hint
            )

    def _build(self, source: SourceConfig, train: bool, batch_size: int) -> Dataset | IterableDataset:
        if source.kind == "captions":
            return CaptionShards(
                source.path,
                self.encoder,
                shuffle_shards=train,
                shuffle_buffer=self.shuffle_buffer if train else 0,
                seed=self.seed,
                resampled=source.resampled and train,
                epoch_length=source.epoch_length if source.resampled and train else None,
                sizes=None if source.resampled and train else source.sizes,
                batch_size=batch_size,
            )
        if source.kind == "instruct":
            return InstructionDataset(source.path, source.image_root, self.encoder, source.follow_links)
        raise ValueError(f"unknown source kind {source.kind!r}: use 'captions' or 'instruct'")

    def _loader(self, sources: list[SourceConfig], what: str) -> DataLoader:
        if self.encoder is None:
            self.setup()
        self._check_sources({what: sources})
        train = what == "train"
        # Alone, caption shards read whole batches per worker (len(loader) exact); in a mixture, samples.
        datasets = [self._build(s, train, self.batch_size if len(sources) == 1 else 1) for s in sources]
        if len(datasets) > 1:
            if not self.mixture_epoch_length:
                raise ValueError(
                    "mixing several sources needs mixture_epoch_length (samples per rank per epoch)"
                )
            dataset: Dataset | IterableDataset = WeightedMixture(
                datasets, [s.weight for s in sources], self.mixture_epoch_length, seed=self.seed
            )
        else:
            dataset = datasets[0]
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        device = self.trainer.strategy.root_device.type if self.trainer is not None else None
        common = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": self.collator,
            # Page-locked batches copy to the GPU asynchronously (Lightning moves them non-blocking).
            "pin_memory": device == "cuda" if device else torch.cuda.is_available(),
        }
        if isinstance(dataset, IterableDataset):
            # No persistent workers: each worker holds its own copy of a streamed dataset, made when the
            # pass starts, and `set_epoch` / a resume offset reach only the copies of the next pass.
            dataset.set_epoch(epoch)
            if train:
                self._iterables.append(dataset)
            if getattr(dataset, "resumable", False):  # a mixture of map-style sources
                return ResumableDataLoader(dataset, **common)
            return DataLoader(dataset, **common)
        # Map-style: epoch and resume offset live in the sampler, in this process, so workers may persist.
        grouping = None
        if train and self.group_by_length:
            index = dataset.index
            grouping = LengthGrouping.from_counts(
                index.word_counts(),
                index.num_images,
                self.encoder.image_tokens_estimate,
                self.batch_size,
                self.group_megabatch,
            )
        sampler = EpochSampler(len(dataset), shuffle=train, seed=self.seed, grouping=grouping)
        sampler.set_epoch(epoch)
        return ResumableDataLoader(dataset, sampler, persistent_workers=self.num_workers > 0, **common)

    def set_epoch(self, epoch: int) -> None:
        """Tell streamed training sources the epoch (samplers get it from Lightning itself)."""
        for dataset in self._iterables:
            dataset.set_epoch(epoch)

    def train_dataloader(self) -> Any:
        # Batches come grouped by optimizer step and annotated with the step's token count, so the
        # module can scale each micro-batch loss before backward (step_tokens.py).
        loader, trainer = self._loader(self.train_sources, "train"), self.trainer
        if trainer is None:
            return StepTokenLoader.wrap(loader)
        return StepTokenLoader.wrap(
            loader, lambda: trainer.accumulate_grad_batches, lambda: trainer.limit_train_batches
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_sources, "val") if self.val_sources else []

    def test_dataloader(self) -> DataLoader:
        if not self.test_sources:
            raise ValueError(
                "test needs data.test: a list of sources such as [{kind: instruct, path: TEST.json, "
                "image_root: DIR}] (conf/test.yaml sets the embedded default's held-out set)"
            )
        return self._loader(self.test_sources, "test")

    def predict_dataloader(self) -> DataLoader:
        if self.predict_source is None:
            raise ValueError(
                "predict needs data.predict: {kind: instruct, path: PROMPTS.json, image_root: DIR}"
            )
        src = self.predict_source
        dataset = PromptDataset(src.path, src.image_root, src.follow_links)
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_prompts
        )

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training:
            epoch = self.trainer.current_epoch
            if self._epoch is not None and epoch != self._epoch:
                self._report()
            self._epoch = epoch
            self.count(batch)
        return batch

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.seen:
            self._report()

    def _report(self) -> None:
        """Log the finished epoch's counts (python logging and the trainer's logger)."""
        summary = self.epoch_summary()
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:
            metrics = {f"data/{k}": float(v) for k, v in summary.items()}
            metrics["data/epoch"] = float(self._epoch or 0)
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def count(self, batch: dict) -> None:
        """Add a batch's kept and skipped samples to the epoch's counters and the skip window."""
        skipped = batch.get("skipped") or {}
        # Padding slots (which even out ranks) are counted under skipped/padding, not as samples seen.
        kept = batch.get("num_samples", len(batch["input_ids"]))  # packed rows hold several samples
        seen = kept + sum(v for k, v in skipped.items() if k != PADDING)
        self.seen += seen
        self.skipped.update(skipped)
        self._window["seen"] += seen
        self._window.update({k: v for k, v in skipped.items() if k != PADDING})
        self._window_batches += 1
        if self._window_batches >= math.ceil(self.skip_window / self.batch_size):
            self._check_window()

    def _check_window(self) -> None:
        """Stop when the window's skipped share, over all ranks, exceeds `max_skip_ratio`. Every rank runs
        the same number of batches, so all reach this check (a collective) at the same batch."""
        window, self._window, self._window_batches = self._window, Counter(), 0
        skipped = sum(v for k, v in window.items() if k != "seen")
        counts = torch.tensor([window["seen"], skipped], dtype=torch.float64)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        seen, skipped = (int(c) for c in counts)
        if seen and skipped / seen > self.max_skip_ratio:
            reasons = ", ".join(f"{k} {v}" for k, v in window.most_common() if k != "seen")
            raise DataSkipError(
                f"stopping: {skipped} of the last {seen} samples were skipped ({skipped / seen:.0%} > "
                f"data.max_skip_ratio {self.max_skip_ratio:.0%}); on this rank: {reasons}. Each skip is logged "
                "with its file or record ('skipping ...'): fix the data, or raise data.max_skip_ratio "
                "(1.0 never stops)"
            )

    def epoch_summary(self) -> dict[str, int]:
        """Samples seen and skipped per reason since the last call (logged, then reset)."""
        summary = {"samples_seen": self.seen, **{f"skipped/{k}": v for k, v in sorted(self.skipped.items())}}
        if set(self.skipped) - {PADDING}:
            log.warning("data: %d samples seen, skipped %s", self.seen, dict(self.skipped))
        else:
            log.info(
                "data: %d samples seen, none skipped (%d padding slots)", self.seen, self.skipped[PADDING]
            )
        self.seen, self.skipped = 0, Counter()
        return summary
