"""The token mean of an optimizer step, known before backward: a look-ahead over the training batches.

The loss of an optimizer step is the mean over all its supervised tokens, on every rank and every
gradient-accumulation micro-batch together, so that accumulation with uneven sequence lengths gives
the gradient of one large batch. Dividing each micro-batch's summed loss by that count must happen
before backward: under DeepSpeed ZeRO the gradients live in DeepSpeed's partitioned buffers, where a
rescaling of `p.grad` after backward does not reach them.

`StepTokenLoader` wraps the training loader and reads the batches of one optimizer step ahead
(`accumulate` micro-batches, aligned with Lightning's accumulation boundaries: counted from the
epoch's first batch, the last group of an epoch shorter, a resumed epoch continuing from its saved
position). It annotates every batch of the group with the group's local supervised-token count
(`batch.count_supervised`: the positions the shifted loss scores) and marks the group's first
batch. The training side sums the count over ranks once per step (every rank is at the same
micro-batch then) and scales each micro-batch's summed loss by it (`training/token_mean.py`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..batch import count_supervised

STEP_TOKENS = "step_tokens"
"""Batch key (`LlavaBatch.step_tokens`): supervised tokens of this rank's micro-batches in the step."""
STEP_FIRST = "step_first"
"""Batch key (`LlavaBatch.step_first`): True on the first micro-batch of an optimizer step."""

IntOrGetter = int | float | Callable[[], int | float]


def epoch_batches(length: int | float | None, limit: int | float = 1.0) -> int | float:
    """Batches Lightning runs in an epoch of a loader of `length` (None: unknown) under
    `Trainer(limit_train_batches=limit)`: an int caps the count, a float is a fraction of a known length."""
    length = math.inf if length is None else length
    if length == 0:
        return 0
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(length, limit)
    if math.isinf(length):
        return length
    return int(length * limit)


def step_groups(start: int, accumulate: int, total: int | float) -> Iterator[int]:
    """Sizes of the optimizer steps' micro-batch groups from batch `start` of an epoch of `total`
    batches: Lightning steps after batch i when (i + 1) % accumulate == 0 or i is the epoch's last."""
    position = start
    while position < total:
        size = accumulate - position % accumulate
        if not math.isinf(total):
            size = min(size, int(total) - position)
        yield size
        position += size


def _resolve(value: IntOrGetter) -> int | float:
    return value() if callable(value) else value


class StepTokenLoader:
    """Iterates `loader` one optimizer step ahead and annotates each batch with the step's local
    supervised-token count (`STEP_TOKENS`) and whether it opens the step (`STEP_FIRST`).

    `accumulate` and `limit` (Lightning's `limit_train_batches`) may be callables, read at the start
    of every pass (e.g. from the trainer). `len()` and every other attribute (sampler, batch_size,
    dataset, ...) are the wrapped loader's. Build it with `StepTokenLoader.wrap`, which returns the
    stateful variant for a loader with `state_dict` / `load_state_dict`.
    """

    def __init__(self, loader: Any, accumulate: IntOrGetter = 1, limit: IntOrGetter = 1.0):
        self.loader = loader
        self.accumulate, self.limit = accumulate, limit
        self._start = 0  # position (batches of the epoch already run) the next pass starts at
        self._start_epoch: int | None = None  # the wrapped loader's epoch that `_start` belongs to
        self._position = 0  # batches of the epoch handed out so far
        self._pending: deque = deque()  # read from `loader`, not yet handed out

    @classmethod
    def wrap(cls, loader: Any, accumulate: IntOrGetter = 1, limit: IntOrGetter = 1.0) -> StepTokenLoader:
        stateful = callable(getattr(loader, "state_dict", None)) and callable(
            getattr(loader, "load_state_dict", None)
        )
        return (ResumableStepTokenLoader if stateful else cls)(loader, accumulate, limit)

    _OWN = frozenset({"loader", "accumulate", "limit", "_start", "_start_epoch", "_position", "_pending"})

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Anything else reaches the wrapped loader (Lightning sets `worker_init_fn` under seeded workers).
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)

    def __len__(self) -> int:
        return len(self.loader)

    def _total(self) -> int | float:
        try:
            length = len(self.loader)
        except TypeError:
            length = None
        return epoch_batches(length, _resolve(self.limit))

    def __iter__(self) -> Iterator[Any]:
        accumulate = max(1, int(_resolve(self.accumulate)))
        total = self._total()
        start, self._start = self._start, 0
        start_epoch, self._start_epoch = self._start_epoch, None
        if start >= total:
            start = 0  # saved at the end of an epoch: the next pass is a new epoch
        if start_epoch is not None and getattr(self.loader, "epoch", start_epoch) != start_epoch:
            start = 0  # the epoch moved on since the position was loaded (the loader starts afresh too)
        self._position = start
        self._pending.clear()
        batches = iter(self.loader)
        for size in step_groups(start, accumulate, total):
            group = list(itertools.islice(batches, size))
            if not group:
                break
            tokens = sum(count_supervised(b) for b in group)
            self._pending.extend(group)
            first = True
            while self._pending:
                batch = self._pending.popleft()
                self._position += 1
                if isinstance(batch, dict):
                    batch = {**batch, STEP_TOKENS: tokens, STEP_FIRST: first}
                first = False
                yield batch
            if len(group) < size:
                break  # the loader ended inside the group (a length-less loader's last step)
        self._position = 0


class ResumableStepTokenLoader(StepTokenLoader):
    """`StepTokenLoader` over a stateful loader: Lightning saves and restores it with the run.

    The state is the wrapped loader's plus the position in the epoch. Batches read ahead but not yet
    handed out are taken back out of a `{"batches": n}` count (`ResumableDataLoader`'s), which only
    matters for a checkpoint saved inside an accumulation group: at a step boundary none are pending.

    A position saved on the epoch's last batch (`limit_train_batches` counted) is where Lightning
    ends that epoch and starts the next: the wrapped `{"epoch": e, "batches": n}` state is loaded
    as `{"epoch": e + 1, "batches": 0}`, so the next epoch is read whole, with its own order.
    """

    def state_dict(self) -> dict[str, Any]:
        state = self.loader.state_dict()
        pending = len(self._pending)
        if pending and isinstance(state, dict) and isinstance(state.get("batches"), int):
            state = {**state, "batches": state["batches"] - pending}
        return {"loader": state, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict) and set(state) == {"loader", "position"}:
            loader_state, position = state["loader"], int(state["position"])
        else:  # a checkpoint written before this wrapper: the loader's own state
            loader_state = state
            position = int(state.get("batches", 0)) if isinstance(state, dict) else 0
        epoch = loader_state.get("epoch") if isinstance(loader_state, dict) else None
        if isinstance(epoch, int) and 0 < self._total() <= position:
            # Saved on the epoch's last batch: Lightning counts the epoch as done and goes on with
            # the next one, from its first batch (not from the saved position, nor in the saved order).
            epoch, position = epoch + 1, 0
            loader_state = {**loader_state, "epoch": epoch, "batches": 0}
        self.loader.load_state_dict(loader_state)
        self._start, self._start_epoch = position, epoch if isinstance(epoch, int) else None
