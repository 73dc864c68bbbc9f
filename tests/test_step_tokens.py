"""The step-token look-ahead: groups follow Lightning's accumulation boundaries, counts match the shifted
loss, resume continues at the saved position, and the loss factor gives the one-large-batch token mean."""

import math

import pytest
import torch
from lightning.fabric.utilities.types import _Stateful

from llava_lightning.batch import count_supervised
from llava_lightning.data.step_tokens import (
    STEP_FIRST,
    STEP_TOKENS,
    ResumableStepTokenLoader,
    StepTokenLoader,
    epoch_batches,
    step_groups,
)
from llava_lightning.model.llava import _shifted_ce
from llava_lightning.training.token_mean import token_mean_scale


def _batches(n: int, seed: int = 0) -> list[dict]:
    """n batches of uneven length and supervision; batch i carries its index."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows, length = 1 + i % 3, 3 + int(torch.randint(0, 9, (1,), generator=g))
        labels = torch.randint(0, 50, (rows, length), generator=g)
        labels[torch.rand(rows, length, generator=g) < 0.4] = -100
        out.append({"index": i, "input_ids": labels.clamp(min=0), "labels": labels})
    return out


class FakeResumableLoader:
    """A list of batches with `ResumableDataLoader`'s state: {"epoch", "batches"} (batches handed out)."""

    def __init__(self, batches):
        self.batches, self.start, self.consumed, self.epoch = batches, 0, 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.consumed, self.start = self.start, 0
        for batch in self.batches[self.consumed :]:
            self.consumed += 1
            yield batch

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state):
        self.epoch, self.start = state["epoch"], state["batches"]


def _lightning_boundaries(start: int, accumulate: int, total: int) -> list[int]:
    """Batch indices after which Lightning steps (`_TrainingEpochLoop._should_accumulate`)."""
    return [i for i in range(start, total) if (i + 1) % accumulate == 0 or i + 1 == total]


@pytest.mark.parametrize(
    "start,accumulate,total", [(0, 3, 8), (0, 4, 8), (4, 3, 8), (5, 3, 8), (0, 1, 3), (8, 3, 8)]
)
def test_step_groups_end_where_lightning_steps(start, accumulate, total):
    sizes = list(step_groups(start, accumulate, total))
    ends = [start + sum(sizes[: k + 1]) - 1 for k in range(len(sizes))]
    assert ends == _lightning_boundaries(start, accumulate, total)


def test_step_groups_without_a_length_and_epoch_batches_under_limits():
    assert list(zip(range(3), step_groups(2, 4, math.inf))) == [(0, 2), (1, 4), (2, 4)]
    assert epoch_batches(10, 1.0) == 10 and epoch_batches(10, 7) == 7 and epoch_batches(10, 0.5) == 5
    assert epoch_batches(None, 1.0) == math.inf and epoch_batches(None, 6) == 6 and epoch_batches(0, 3) == 0


def test_count_is_the_shifted_losss_supervised_count():
    for batch in _batches(6):
        logits = torch.randn(*batch["labels"].shape, 50)
        assert count_supervised(batch) == int(_shifted_ce(logits, batch["labels"], None)[2])
    assert count_supervised({"labels": torch.zeros(0, 0, dtype=torch.long)}) == 0  # every sample skipped
    assert count_supervised(["not", "a", "dict"]) == 0


@pytest.mark.parametrize(
    "accumulate,limit,groups", [(3, 1.0, [3, 3, 2]), (4, 1.0, [4, 4]), (3, 7, [3, 3, 1]), (3, 0.5, [3, 1])]
)
def test_batches_carry_their_steps_token_count_with_a_short_last_group(accumulate, limit, groups):
    batches = _batches(8)
    seen = list(StepTokenLoader(batches, accumulate, limit))
    assert [b["index"] for b in seen] == list(range(sum(groups)))
    i = 0
    for size in groups:
        group = seen[i : i + size]
        expected = sum(count_supervised(b) for b in batches[i : i + size])
        assert [b[STEP_TOKENS] for b in group] == [expected] * size
        assert [b[STEP_FIRST] for b in group] == [True] + [False] * (size - 1)
        i += size
    assert all(STEP_TOKENS not in b for b in batches)  # the loader's own batches are left as they were


def test_a_length_less_loader_ends_in_a_short_group():
    seen = list(StepTokenLoader(iter(_batches(7)), accumulate=3))
    assert [b[STEP_FIRST] for b in seen] == [True, False, False, True, False, False, True]
    assert seen[-1][STEP_TOKENS] == count_supervised(seen[-1])


def test_resume_mid_epoch_continues_the_groups_at_the_saved_position():
    batches = _batches(8)
    wrapped = StepTokenLoader.wrap(FakeResumableLoader(batches), accumulate=3)
    assert isinstance(wrapped, ResumableStepTokenLoader) and isinstance(wrapped, _Stateful)
    it = iter(wrapped)
    for _ in range(6):  # two optimizer steps, a checkpoint at the boundary
        next(it)
    state = wrapped.state_dict()
    assert state == {"loader": {"epoch": 0, "batches": 6}, "position": 6}
    next(it)  # inside the last group: the group's second batch is read but not handed out yet
    assert wrapped.state_dict() == {"loader": {"epoch": 0, "batches": 7}, "position": 7}

    resumed = StepTokenLoader.wrap(FakeResumableLoader(batches), accumulate=3)
    resumed.load_state_dict(state)
    seen = list(resumed)
    assert [b["index"] for b in seen] == [6, 7]
    assert [b[STEP_TOKENS] for b in seen] == [count_supervised(batches[6]) + count_supervised(batches[7])] * 2
    # a position that is not a boundary (a checkpoint inside a group): the rest of that group first
    mid = StepTokenLoader.wrap(FakeResumableLoader(batches), accumulate=3)
    mid.load_state_dict({"loader": {"epoch": 0, "batches": 4}, "position": 4})
    assert [b[STEP_FIRST] for b in mid] == [True, False, True, False]
    # a checkpoint written before the wrapper existed (the loader's own state)
    legacy = StepTokenLoader.wrap(FakeResumableLoader(batches), accumulate=3)
    legacy.load_state_dict({"epoch": 0, "batches": 3})
    assert [b["index"] for b in legacy][:1] == [3]


def test_a_position_saved_at_the_epochs_end_starts_the_next_epoch_at_its_first_batch():
    wrapped = StepTokenLoader(_batches(8), accumulate=3)
    wrapped._start = 8
    assert [b[STEP_FIRST] for b in wrapped] == [True, False, False] * 2 + [True, False]


def test_the_wrapper_is_the_loader_for_everything_else():
    class Loader(list):
        sampler, worker_init_fn = "the sampler", None

    inner = Loader(_batches(2))
    wrapped = StepTokenLoader.wrap(inner, accumulate=2)
    assert type(wrapped) is StepTokenLoader and not isinstance(wrapped, _Stateful)
    assert len(wrapped) == 2 and wrapped.sampler == "the sampler"
    wrapped.worker_init_fn = print  # Lightning seeds workers this way
    assert inner.worker_init_fn is print and "worker_init_fn" not in vars(wrapped)


@pytest.mark.parametrize("world_size,accumulate", [(1, 1), (1, 3), (2, 1), (2, 3), (3, 2)])
def test_scaled_micro_batch_losses_give_the_one_large_batch_gradient(world_size, accumulate):
    """Rank r, micro-batch k: token losses (w * x)^2 over an uneven number of tokens (some none). Each
    micro-batch returns loss_sum * token_mean_scale(step tokens); Lightning divides by `accumulate`,
    the strategy averages gradients over ranks. That must be the gradient of the mean over all tokens."""
    g = torch.Generator().manual_seed(world_size * 10 + accumulate)
    counts = torch.randint(0, 7, (world_size, accumulate), generator=g)
    counts[0, 0] = 5  # some micro-batches have no supervised token, not all
    xs = [[torch.randn(int(n), generator=g) for n in rank] for rank in counts]
    step_tokens = torch.tensor(sum(len(x) for rank in xs for x in rank))  # the all-reduced count
    w = torch.tensor(0.7, requires_grad=True)
    rank_grads = []
    for rank in xs:
        grad = torch.zeros(())
        for x in rank:
            loss = ((w * x) ** 2).sum() * token_mean_scale(step_tokens, accumulate, world_size)
            (g_k,) = torch.autograd.grad(loss / accumulate, w)  # Lightning's division
            grad += g_k
        rank_grads.append(grad)
    averaged = torch.stack(rank_grads).mean()  # DDP / FSDP / ZeRO average over ranks
    everything = torch.cat([x for rank in xs for x in rank])
    (expected,) = torch.autograd.grad(((w * everything) ** 2).mean(), w)
    torch.testing.assert_close(averaged, expected)
