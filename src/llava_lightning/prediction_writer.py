"""`PredictionWriter`: a Lightning callback that writes `predict` replies as JSON lines.

One line per record, `{"id", "prompt", "reply"}`, written as batches finish (nothing is held in
memory). With several ranks each writes `<stem>.rank<k>.jsonl`, since ranks predict disjoint
records; a single process writes the path as given.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Appends each predict batch's replies to a JSONL file."""

    def __init__(self, output: str = "predictions.jsonl"):
        """
        Args:
            output: JSONL file to write (replaced at the start of predict).
        """
        super().__init__(write_interval="batch")
        self.output = output
        self._path: Path | None = None

    def path_for(self, trainer: L.Trainer) -> Path:
        path = Path(self.output)
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._path = self.path_for(trainer)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_text("")

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._path is not None
        with self._path.open("a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("predictions written to %s", self._path)
