"""Resuming a checkpoint written after an epoch's last batch, under `max_steps` (Lightning issue #19617).

Lightning 2.x resumes such a checkpoint (`on_train_epoch_end`, `on_validation_end`, `on_train_end`, or
`trainer.save_checkpoint` after `fit`) wrongly when `max_steps` is set: it runs the next epoch, or the
finished one again, with no batches and counts it, so an epoch of data is left out or the run stops one
epoch early under `max_epochs`, and the samplers get epoch numbers one too high from then on. The same
checkpoint written on the last batch (`on_train_batch_end`) it resumes at the next epoch's first batch,
as the uninterrupted run goes on: `epoch_end_as_last_batch` rewrites the loop state into that form.
"""

from __future__ import annotations

from typing import Any


def epoch_end_as_last_batch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the fit loop's state of a checkpoint written after an epoch's last batch had run through as
    that of the same checkpoint written on the last batch. Returns whether it rewrote."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop")
    try:
        epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
        e, b = epochs["total"], batches["total"]
        at_epoch_end = (
            e["ready"] == e["started"] == e["processed"] > 0
            and e["completed"] in (e["processed"] - 1, e["processed"])
            and batches["is_last_batch"]
            and b["ready"] == b["started"] == b["processed"] == b["completed"] > 0
        )
    except (KeyError, TypeError):
        return False
    if not at_epoch_end:
        return False
    for tracker in (epochs["total"], epochs["current"]):
        tracker["processed"] = tracker["completed"] = tracker["started"] - 1
    for tracker in (batches["total"], batches["current"]):
        tracker["completed"] -= 1
    # Lightning counts the step again when it resumes after a last batch's on_train_batch_end.
    loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    return True
