"""`SampleReplies`: at the end of each validation, the model's replies to a few fixed held-out samples,
logged with their images, so a user watching a run sees what the model says, not only its loss.

The samples are chosen once: the first `num_samples` records with an image of the first instruction
source of `data.val` (or of `source`). Each is the record's first human turn (its `<image>` lines
removed: generation puts one back per image, as `predict` does), its images and, as the reference, the
record's first gpt turn. The replies are greedy (`inference.generate`, the model's `template` and
`image_aspect`, `max_new_tokens`), at the trainer's precision. Logged at the global step:

    TensorBoardLogger   val_samples/<k>/image (HWC uint8; `image_<j>` for a record's further images)
                        and val_samples/<k>/text (markdown: prompt, reply, reference)
    others with `log_text` (W&B)   one table `val_samples` (id, prompt, reply, reference), and the
                        images through `log_image` where the logger has it
    any other logger    skipped, with one info message

Strategies: under DDP (or one device) rank 0 alone generates. Under FSDP2 and DeepSpeed, which gather
parameters module by module on all ranks together, every rank generates the same replies (same samples,
same gathered weights, greedy: the ranks stop at the same step) and rank 0 logs them. FSDP1 wraps the
LightningModule itself, so its model cannot run a forward outside the module's own: skipped there, with
a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..data.datamodule import SourceConfig
from ..data.prompts import PromptDataset
from ..inference.generate import generate
from .strategies import shards_modules

log = logging.getLogger(__name__)

TAG = "val_samples"


def reference_of(record: dict[str, Any]) -> str:
    """The record's first gpt turn (the answer the data gives to the prompt), or '' without one."""
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
            return turn["value"]
    return ""


def sample_text(prompt: str, reply: str, reference: str) -> str:
    """The markdown TensorBoard shows for one sample."""
    return f"**prompt:** {prompt}\n\n**reply:** {reply}\n\n**reference:** {reference}"


def _fitted(image: Any, max_side: int | None) -> np.ndarray:
    """`image` (PIL) as an HWC uint8 array, downscaled (aspect kept) so its long side is at most `max_side`."""
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class SampleReplies(Callback):
    """Log the model's greedy replies to `num_samples` fixed validation samples, with their images."""

    def __init__(
        self,
        num_samples: int = 4,
        max_new_tokens: int = 32,
        every_n_val: int = 1,
        source: SourceConfig | None = None,
        max_image_side: int | None = 512,
    ):
        """
        Args:
            num_samples: How many samples (the first records with an image of the source).
            max_new_tokens: Reply length limit.
            every_n_val: Log at the 1st validation and every n-th after it (the sanity check never logs).
            source: An instruction JSON source (`{kind: instruct, path, image_root}`) to take the samples
                from; None: the first instruction source of the data module's `data.val`.
            max_image_side: Images are logged downscaled to this long side (None: as decoded).
        """
        if num_samples < 1 or every_n_val < 1 or max_new_tokens < 1:
            raise ValueError(
                f"num_samples, max_new_tokens and every_n_val must be >= 1, got {num_samples}, "
                f"{max_new_tokens}, {every_n_val}"
            )
        if source is not None and source.kind != "instruct":
            raise ValueError(f"SampleReplies reads an instruction JSON source, got kind {source.kind!r}")
        self.num_samples, self.max_new_tokens, self.every_n_val = num_samples, max_new_tokens, every_n_val
        self.source, self.max_image_side = source, max_image_side
        self.samples: list[dict[str, Any]] | None = None
        self.validations = 0
        self._said: set[str] = set()

    # ----------------------------------------------------------------------------------- samples
    def _source(self, trainer: Any) -> SourceConfig | None:
        if self.source is not None:
            return self.source
        dm = getattr(trainer, "datamodule", None)
        for source in getattr(dm, "val_sources", None) or []:
            if source.kind == "instruct":
                return source
        return None

    def load_samples(self, source: SourceConfig) -> list[dict[str, Any]]:
        """`{"id", "prompt", "images", "reference"}` of the first `num_samples` records with an image."""
        dataset = PromptDataset(source.path, source.image_root, source.follow_links)
        samples = []
        for index, record in enumerate(dataset.records):
            if len(samples) == self.num_samples:
                break
            if not (isinstance(record, dict) and record.get("image")):
                continue
            try:
                sample = dataset[index]
            except ValueError as err:  # names the record and the fix; a picture never ends a run
                rank_zero_warn(f"SampleReplies skips a sample: {err}")
                continue
            sample["reference"] = reference_of(record)
            samples.append(sample)
        return samples

    def _once(self, key: str, message: str, warn: bool = False) -> None:
        if key not in self._said:
            self._said.add(key)
            (rank_zero_warn if warn else rank_zero_info)(message)

    # ----------------------------------------------------------------------------------- hook
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}  # a resumed run keeps the every_n_val rhythm

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def due(self) -> bool:
        """Count a validation; True at the 1st and every `every_n_val`-th after it."""
        self.validations += 1
        return (self.validations - 1) % self.every_n_val == 0

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self.due():
            return
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            self._once(
                "fsdp1", "SampleReplies: FSDP1 runs no forward outside the module's own; not logged", True
            )
            return
        sharded = shards_modules(strategy)
        if not (trainer.is_global_zero or sharded):
            return  # DDP: rank 0 alone generates
        if self.samples is None:
            source = self._source(trainer)
            if source is None:
                self._once(
                    "source", "SampleReplies: no instruction source in data.val (nor `source`); not logged"
                )
                self.samples = []
            else:
                self.samples = self.load_samples(source)
                log.info("SampleReplies: %d samples of %s", len(self.samples), source.path)
        if not self.samples:
            return
        replies = self.replies(trainer, pl_module)
        if trainer.is_global_zero:
            self.log_samples(trainer, replies)

    def replies(self, trainer: Any, pl_module: Any) -> list[str]:
        """The model's greedy replies to the samples (every rank of a sharded strategy calls this)."""
        assert self.samples is not None
        # The precision the validation step runs under (autocast for *-mixed), outside its step here.
        with trainer.precision_plugin.forward_context():
            return generate(
                pl_module.model,
                [s["images"] for s in self.samples],
                [s["prompt"] for s in self.samples],
                template=pl_module.template,
                aspect=pl_module.image_aspect,
                max_new_tokens=self.max_new_tokens,
            )

    def log_samples(self, trainer: Any, replies: list[str]) -> None:
        assert self.samples is not None
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                for k, (sample, reply) in enumerate(zip(self.samples, replies)):
                    for j, image in enumerate(sample["images"] or []):
                        name = "image" if j == 0 else f"image_{j}"
                        writer.add_image(
                            f"{TAG}/{k}/{name}", _fitted(image, self.max_image_side), step, dataformats="HWC"
                        )
                    writer.add_text(
                        f"{TAG}/{k}/text", sample_text(sample["prompt"], reply, sample["reference"]), step
                    )
            elif hasattr(logger, "log_text"):  # W&B
                rows = [[str(s["id"]), s["prompt"], r, s["reference"]] for s, r in zip(self.samples, replies)]
                logger.log_text(key=TAG, columns=["id", "prompt", "reply", "reference"], data=rows, step=step)
                if hasattr(logger, "log_image"):
                    images = [_fitted(s["images"][0], self.max_image_side) for s in self.samples]
                    logger.log_image(key=f"{TAG}/images", images=images, step=step, caption=replies)
            else:
                self._once(
                    type(logger).__name__,
                    f"SampleReplies: {type(logger).__name__} takes no text or images; replies not logged there",
                )
