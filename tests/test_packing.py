"""Sequence packing (`data.pack_tokens`): rows of whole samples, each attending only to itself.

The packed path is checked against the padded path it replaces: the same loss sum, supervised count
and gradients for the same samples, other samples' logits untouched by a change of one sample, the
same token counts and samples seen through `Trainer.fit` with accumulation, and each sample read
once by two lockstep ranks. Everything in fp32 on the CPU.
"""

import json
import math
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer, run_ranks
from torch.utils.data import DataLoader

from llava_lightning.batch import IGNORE_INDEX, count_supervised
from llava_lightning.data import LlavaDataModule, SourceConfig
from llava_lightning.data.collate import LlavaCollator
from llava_lightning.data.instruct import InstructionDataset
from llava_lightning.data.packing import SampleTooLongError, first_fit_decreasing, pack_samples
from llava_lightning.data.sample import skip
from llava_lightning.data.sampler import EpochSampler
from llava_lightning.model import get_preset
from llava_lightning.model.packed_attention import VARLEN, packed_lm_kwargs
from llava_lightning.module import LlavaLitModule, OptimConfig

# -- helpers ----------------------------------------------------------------------------------------


def _lit(attn: str | None = None) -> LlavaLitModule:
    spec = get_preset("tiny")
    spec.language.attn_implementation = attn
    torch.manual_seed(0)
    return LlavaLitModule(spec=spec, stage="finetune")


def _sample(model, images: int, prompt: int, reply: int, seed: int) -> dict:
    """An encoded instruction sample: prompt text with `images` image spans, then a supervised reply."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(3, 900, (2,), generator=gen)]
    for _ in range(images):
        parts += [torch.full((model.vision_tower.num_tokens,), model.image_token_id)]
        parts += [torch.randint(3, 900, (2,), generator=gen)]
    parts += [torch.randint(3, 900, (prompt,), generator=gen)]
    ids = torch.cat(parts + [torch.randint(3, 900, (reply,), generator=gen)])
    labels = ids.clone()
    labels[: len(ids) - reply] = IGNORE_INDEX
    size = model.vision_tower.image_size
    pixels = torch.randint(0, 256, (images, 3, size, size), generator=gen, dtype=torch.uint8)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def _samples(model) -> list[dict]:
    # Different lengths; text-only and two-image samples; one supervised from its first token (as a
    # pretraining text would be), whose first label only the boundary rule keeps out of the loss.
    shapes = [(1, 6, 9), (0, 11, 5), (2, 4, 14), (1, 3, 3), (1, 9, 20), (0, 0, 7)]
    samples = [_sample(model, *shape, seed=i) for i, shape in enumerate(shapes)]
    samples[-1]["labels"] = samples[-1]["input_ids"].clone()
    return samples


def _forward(lit, batch, logits=False):
    return lit(batch, return_logits=logits)


def _grads(lit, batch) -> dict[str, torch.Tensor]:
    lit.zero_grad()
    out = _forward(lit, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in lit.named_parameters() if p.grad is not None}
    lit.zero_grad()
    return out, grads


def _segments(samples, capacity):
    """(row, start) of each sample in the packed layout."""
    where = {}
    for r, row in enumerate(first_fit_decreasing([len(s["input_ids"]) for s in samples], capacity)):
        start = 0
        for i in row:
            where[i] = (r, start)
            start += len(samples[i]["input_ids"])
    return where


# -- the layout -------------------------------------------------------------------------------------


def test_first_fit_decreasing_fills_rows_in_sample_order():
    # Longest first: 8 -> row A, 6 -> row B, 5 -> row C, 3 -> B (room 4), 2 -> A (room 2).
    assert first_fit_decreasing([5, 3, 8, 2, 6], 10) == [[0], [1, 4], [2, 3]]
    assert first_fit_decreasing([], 10) == []
    with pytest.raises(SampleTooLongError, match="pack_tokens >= data.max_length"):
        first_fit_decreasing([4, 11], 10)


def test_packed_rows_restart_positions_ignore_boundaries_and_pad_only_the_tail():
    lit = _lit()
    samples = _samples(lit.model)
    lengths = [len(s["input_ids"]) for s in samples]
    capacity = 48
    markers = [{"__skipped__": "bad_image", "where": "x"}]
    batch = LlavaCollator(pad_token_id=0, pack_tokens=capacity)(samples + markers)
    rows = first_fit_decreasing(lengths, capacity)
    # Rows as wide as the fullest one, not `capacity` (here all fit in fewer than 48 tokens).
    width = max(sum(lengths[i] for i in row) for row in rows)
    assert width < capacity
    assert batch["input_ids"].shape == (len(rows), width) and len(rows) < len(samples)
    assert batch["num_samples"] == len(samples) and batch["skipped"] == {"bad_image": 1}
    segments = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            assert torch.equal(batch["input_ids"][r, start : start + n], samples[i]["input_ids"])
            assert torch.equal(batch["position_ids"][r, start : start + n], torch.arange(n))
            assert batch["labels"][r, start] == IGNORE_INDEX  # no prediction across the boundary
            assert torch.equal(batch["labels"][r, start + 1 : start + n], samples[i]["labels"][1:])
            segments.append(n)
            start += n
        tail = width - start
        assert batch["attention_mask"][r].sum() == start and not batch["attention_mask"][r, start:].any()
        assert (batch["labels"][r, start:] == IGNORE_INDEX).all()
        assert torch.equal(batch["position_ids"][r, start:], torch.arange(tail))
        segments += [tail] if tail else []
    assert batch["cu_seqlens"].tolist() == [0, *torch.tensor(segments).cumsum(0).tolist()]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_seqlen"] == max(segments)
    # Images in the order of their tokens in the rows laid end to end.
    order = [i for row in rows for i in row]
    expected = torch.cat([samples[i]["pixel_values"] for i in order])
    assert torch.equal(batch["pixel_values"], expected)
    # The supervised count is the padded batch's.
    padded = LlavaCollator(pad_token_id=0)(samples)
    assert count_supervised(batch) == count_supervised(padded) > 0
    # pad_to_multiple_of rounds the width up, never past the capacity.
    for multiple in (1, 8, 40):
        rounded = LlavaCollator(pad_token_id=0, pack_tokens=capacity, pad_to_multiple_of=multiple)(samples)
        assert rounded["input_ids"].shape == (len(rows), min(-(-width // multiple) * multiple, capacity))
        assert torch.equal(rounded["input_ids"][:, :width], batch["input_ids"])


def test_an_all_skipped_batch_packs_to_no_rows():
    batch = LlavaCollator(pad_token_id=0, pack_tokens=16)([{"__skipped__": "bad_image", "where": "x"}])
    assert batch["input_ids"].shape == (0, 0) and batch["num_samples"] == 0
    assert batch["pixel_values"] is None and batch["cu_seqlens"].tolist() == [0]


def test_packing_fills_rows_of_a_llava_665k_like_length_mix():
    # 576 image tokens + text of log-normal length (median ~120, long tail to 1400), 5% text-only
    # (50..1500 tokens); max_length = pack_tokens = 2048; 32 batches of 16 samples per rank.
    gen = torch.Generator().manual_seed(0)
    padded = packed = real = 0
    for _ in range(32):
        lengths = []
        for _ in range(16):
            text = int(torch.empty(1).log_normal_(math.log(120), 0.9, generator=gen).clamp(20, 1400))
            if torch.rand(1, generator=gen) < 0.05:
                lengths.append(int(torch.randint(50, 1500, (1,), generator=gen)))
            else:
                lengths.append(576 + text)
        samples = [
            {"input_ids": torch.ones(n, dtype=torch.long), "labels": torch.ones(n, dtype=torch.long),
             "pixel_values": torch.empty(0, 3, 4, 4)} for n in lengths
        ]  # fmt: skip
        batch = pack_samples(samples, 2048, 0)
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
        packed += batch["input_ids"].numel()
        # First-fit decreasing: at most one row more than the tokens need.
        assert len(batch["input_ids"]) <= math.ceil(sum(lengths) / 2048) + 1
    # Measured: padded batches are 59% real tokens, packed rows 86% (a batch's last row is part-full),
    # 0.69x the padded batches' tokens.
    assert real / packed > 0.84
    assert real / padded < 0.62
    assert packed < 0.72 * padded


# -- the model: same loss and gradients, no attention across samples ----------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_packed_rows_give_the_padded_batchs_loss_sum_count_logits_and_gradients(attn):
    lit = _lit(attn)
    samples = _samples(lit.model)
    padded = LlavaCollator(pad_token_id=0)(samples)
    capacity = 48
    packed = LlavaCollator(pad_token_id=0, pack_tokens=capacity)(samples)
    assert len(packed["input_ids"]) < len(padded["input_ids"])
    out_padded, grads_padded = _grads(lit, padded)
    out_packed, grads_packed = _grads(lit, packed)
    assert int(out_packed.num_supervised) == int(out_padded.num_supervised) == count_supervised(padded)
    torch.testing.assert_close(out_packed.loss_sum, out_padded.loss_sum, rtol=1e-5, atol=0)
    assert set(grads_packed) == set(grads_padded) and grads_padded
    for name, reference in grads_padded.items():
        # Per parameter: |g_packed - g_padded| <= 1e-5 |g_padded| (norms over the tensor).
        error = (grads_packed[name] - reference).norm()
        assert error <= 1e-5 * reference.norm() + 1e-12, f"{name}: {error / reference.norm():.2e}"
    # Every real token's logits are the padded batch's.
    with torch.no_grad():
        logits_padded = _forward(lit, padded, logits=True).logits
        logits_packed = _forward(lit, packed, logits=True).logits
    for i, (r, s) in _segments(samples, capacity).items():
        n = len(samples[i]["input_ids"])
        torch.testing.assert_close(logits_packed[r, s : s + n], logits_padded[i, :n], rtol=1e-5, atol=1e-5)


def _anyres_sample(model, sizes: list[tuple[int, int]], prompt: int, reply: int, seed: int) -> dict:
    """An encoded LLaVA-NeXT sample: each image (height, width) its own token count and crops."""
    geometry, gen = model.anyres, torch.Generator().manual_seed(seed)
    parts = [torch.randint(3, 900, (2,), generator=gen)]
    for h, w in sizes:
        parts += [torch.full((geometry.num_tokens(h, w),), model.image_token_id)]
        parts += [torch.randint(3, 900, (2,), generator=gen)]
    parts += [torch.randint(3, 900, (prompt + reply,), generator=gen)]
    ids = torch.cat(parts)
    labels = ids.clone()
    labels[: len(ids) - reply] = IGNORE_INDEX
    crops = sum(geometry.num_crops(h, w) for h, w in sizes)
    size = geometry.tile
    pixels = torch.randint(0, 256, (crops, 3, size, size), generator=gen, dtype=torch.uint8)
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2),
    }


def test_anyres_packed_rows_give_the_padded_batchs_loss_sum_logits_and_gradients():
    """LLaVA-NeXT samples (each image its own crops and count) packed out of sample order: the padded
    batch's loss sum, logits and gradients (image_newline's included)."""
    spec = get_preset("tiny-next")
    torch.manual_seed(0)
    lit = LlavaLitModule(spec=spec, stage="finetune")
    model = lit.model
    shapes = [([(300, 500)], 30, 9), ([(190, 70), (80, 200)], 20, 14), ([(60, 60)], 2, 3), ([], 11, 5)]
    samples = [_anyres_sample(model, *shape, seed=i) for i, shape in enumerate(shapes)]
    collate = dict(pad_token_id=0, image_token_id=model.image_token_id, anyres=model.anyres)
    padded = LlavaCollator(**collate)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    capacity = max(lengths[0] + lengths[2], max(lengths))  # rows [0, 2, ...], [1, ...]: images reordered
    packed = LlavaCollator(**collate, pack_tokens=capacity)(samples)
    layout = _segments(samples, capacity)
    assert len(packed["input_ids"]) < len(padded["input_ids"])
    assert packed["image_sizes"].tolist() != padded["image_sizes"].tolist()  # packing reordered the images
    out_padded, grads_padded = _grads(lit, padded)
    out_packed, grads_packed = _grads(lit, packed)
    assert int(out_packed.num_supervised) == int(out_padded.num_supervised) == count_supervised(padded)
    torch.testing.assert_close(out_packed.loss_sum, out_padded.loss_sum, rtol=1e-5, atol=0)
    assert "model.image_newline" in grads_padded and set(grads_packed) == set(grads_padded)
    for name, reference in grads_padded.items():
        error = (grads_packed[name] - reference).norm()
        assert error <= 1e-5 * reference.norm() + 1e-12, f"{name}: {error / reference.norm():.2e}"
    with torch.no_grad():
        logits_padded = _forward(lit, padded, logits=True).logits
        logits_packed = _forward(lit, packed, logits=True).logits
    for i, (r, s) in layout.items():
        n = len(samples[i]["input_ids"])
        torch.testing.assert_close(logits_packed[r, s : s + n], logits_padded[i, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_tail_padding_changes_no_real_tokens_logits(attn):
    lit = _lit(attn)
    samples = _samples(lit.model)
    total = sum(len(s["input_ids"]) for s in samples)
    with torch.no_grad():  # one row of all samples, without a tail and with a tail of 37 pad tokens
        tight = _forward(lit, LlavaCollator(0, pack_tokens=total)(samples), logits=True).logits
        tailed = LlavaCollator(0, pad_to_multiple_of=total + 37, pack_tokens=total + 37)(samples)
        tailed = _forward(lit, tailed, logits=True).logits
    assert tight.shape[:2] == (1, total) and tailed.shape[:2] == (1, total + 37)
    assert (tailed[0, :total] - tight[0]).abs().max() < 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_changing_one_sample_leaves_the_other_samples_of_its_row_untouched(attn):
    lit = _lit(attn).eval()
    model = lit.model
    samples = [_sample(model, 1, 5, 8, seed=1), _sample(model, 2, 3, 6, seed=2), _sample(model, 0, 7, 9, 3)]
    capacity = sum(len(s["input_ids"]) for s in samples) + 5  # one row, with a tail
    changed = [dict(s) for s in samples]
    middle = samples[1]["input_ids"]
    text = middle != model.image_token_id
    new_ids = middle.clone()
    new_ids[text] = (middle[text] + 17) % 900 + 3  # every text token different
    assert (new_ids[text] != middle[text]).all()
    changed[1] = {**samples[1], "input_ids": new_ids, "pixel_values": 255 - samples[1]["pixel_values"]}
    collate = LlavaCollator(pad_token_id=0, pack_tokens=capacity, pad_to_multiple_of=capacity)
    before, after = collate(samples), collate(changed)
    assert before["input_ids"].shape[1] == capacity
    assert len(before["input_ids"]) == 1
    with torch.no_grad():
        a = _forward(lit, before, logits=True).logits[0]
        b = _forward(lit, after, logits=True).logits[0]
        # The control: the same rows with one causal mask over the whole row (no isolation).
        plain = model(after["input_ids"], after["attention_mask"], after["pixel_values"]).logits[0]
    n0, n1 = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    others = torch.cat([torch.arange(n0), torch.arange(n0 + n1, capacity - 5)])
    assert (b[others] - a[others]).abs().max() < 1e-6
    assert (b[n0 : n0 + n1] - a[n0 : n0 + n1]).abs().max() > 1e-3  # the changed sample did change
    assert (plain[n0 + n1 :] - b[n0 + n1 :]).abs().max() > 1e-3  # without isolation the third would too


def test_a_backend_that_cannot_isolate_packed_samples_is_refused():
    with pytest.raises(ValueError, match="attn_implementation to one of"):
        packed_lm_kwargs("paged|eager", None, None)
    with pytest.raises(ValueError, match="cu_seqlens and max_seqlen"):
        packed_lm_kwargs("flash_attention_2", None, None)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert packed_lm_kwargs("flash_attention_2", cu, 5)["max_length_k"] == 5
    assert packed_lm_kwargs(None, None, None) == {"use_cache": False}  # a cache would turn detection off


# -- llava_varlen: the registered varlen kernel ------------------------------------------------------


def _reference_varlen(
    q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """`varlen_attn` (CUDA only) as per-segment causal sdpa: `[T, H, D]` in and out."""
    assert window_size == (-1, 0) and torch.equal(cu_q, cu_k)
    outs = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        seg = [x[s:e].transpose(0, 1)[None] for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def test_the_varlen_kernels_layout_gives_sdpas_packed_loss_and_gradients(monkeypatch):
    # The kernel is CUDA-only; a per-segment reference stands in for it (and the CUDA branch is forced),
    # so this checks what `varlen_attention_forward` does around it: rows laid end to end, segments,
    # GQA, causality. (On CPU `llava_varlen` runs `segment_attention`: the parametrized tests above.)
    import torch.nn.attention.varlen as varlen

    from llava_lightning.model import packed_attention

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen)
    monkeypatch.setattr(packed_attention, "uses_varlen_kernel", lambda query: True)
    sdpa, kernel = _lit("sdpa"), _lit(VARLEN)
    kernel.load_state_dict(sdpa.state_dict())
    assert kernel.model.language_model.config._attn_implementation == VARLEN
    samples = _samples(sdpa.model)
    packed = LlavaCollator(pad_token_id=0, pack_tokens=48)(samples)
    padded = LlavaCollator(pad_token_id=0)(samples)
    out_sdpa, grads_sdpa = _grads(sdpa, packed)
    out_kernel, grads_kernel = _grads(kernel, packed)
    torch.testing.assert_close(out_kernel.loss_sum, out_sdpa.loss_sum, rtol=1e-5, atol=0)
    for name, reference in grads_sdpa.items():
        assert (grads_kernel[name] - reference).norm() <= 1e-5 * reference.norm() + 1e-12, name
    # Padded batches (a 2-D mask) take sdpa inside the kernel: the same loss as sdpa's.
    with torch.no_grad():
        torch.testing.assert_close(
            _forward(kernel, padded).loss_sum, _forward(sdpa, padded).loss_sum, rtol=1e-5, atol=0
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen kernel runs on CUDA only")
def test_the_varlen_kernel_on_cuda_matches_sdpa_on_packed_rows():
    sdpa, kernel = _lit("sdpa"), _lit(VARLEN)
    kernel.load_state_dict(sdpa.state_dict())
    samples = _samples(sdpa.model)
    packed = LlavaCollator(pad_token_id=0, pack_tokens=48)(samples)
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    losses = []
    for lit in (sdpa, kernel):
        lit.to("cuda", torch.bfloat16)
        with torch.no_grad():
            losses.append(_forward(lit, packed).loss_sum.float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)  # bf16 kernels differ by ~1e-3


# -- the data module under Trainer.fit ----------------------------------------------------------------


class _StepRecorder(LlavaLitModule):
    """Keeps each optimizer step's token count and gradients."""

    def on_before_optimizer_step(self, optimizer):
        if not hasattr(self, "steps"):
            self.steps = []
        grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}
        self.steps.append((int(self.step_tokens.logged), grads))
        super().on_before_optimizer_step(optimizer)


class _SummaryDataModule(LlavaDataModule):
    def epoch_summary(self):
        self.summary = super().epoch_summary()
        return self.summary


def _fit(shapes_dir, tmp_path, pack_tokens, preset="tiny", max_length=128):
    torch.manual_seed(0)
    lit = _StepRecorder(preset=preset, stage="finetune", optim=OptimConfig(lr=0.0))
    source = SourceConfig(
        kind="instruct",
        path=str(shapes_dir / "instruct/llava_instruct.json"),
        image_root=str(shapes_dir / "instruct"),
    )
    dm = _SummaryDataModule(
        train=[source], batch_size=4, num_workers=0, max_length=max_length, pack_tokens=pack_tokens
    )
    quiet_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2).fit(lit, datamodule=dm)
    return lit.steps, dm.summary


def test_pack_tokens_trains_through_fit_with_the_padded_paths_token_counts(shapes_dir, tmp_path):
    # lr 0: the parameters stay put, so each step's gradient depends only on its samples.
    padded_steps, padded_summary = _fit(shapes_dir, tmp_path, None)
    packed_steps, packed_summary = _fit(shapes_dir, tmp_path, 256)
    assert len(packed_steps) == len(padded_steps) == 2
    for (tokens_padded, grads_padded), (tokens_packed, grads_packed) in zip(padded_steps, packed_steps):
        assert tokens_packed == tokens_padded > 0
        assert set(grads_packed) == set(grads_padded)
        for name, reference in grads_padded.items():
            assert (grads_packed[name] - reference).norm() <= 1e-5 * reference.norm() + 1e-12, name
    assert packed_summary == padded_summary and packed_summary["samples_seen"] == 16


def test_anyres_pack_tokens_trains_through_fit_with_the_padded_paths_token_counts(shapes_dir, tmp_path):
    """The same through `Trainer.fit` with `tiny-next` (the data module tiles each image, links the geometry)."""
    padded_steps, padded_summary = _fit(shapes_dir, tmp_path, None, "tiny-next", 192)
    packed_steps, packed_summary = _fit(shapes_dir, tmp_path, 400, "tiny-next", 192)
    assert len(packed_steps) == len(padded_steps) == 2
    for (tokens_padded, grads_padded), (tokens_packed, grads_packed) in zip(padded_steps, packed_steps):
        assert tokens_packed == tokens_padded > 0
        assert "model.image_newline" in grads_padded and set(grads_packed) == set(grads_padded)
        for name, reference in grads_padded.items():
            assert (grads_packed[name] - reference).norm() <= 1e-5 * reference.norm() + 1e-12, name
    assert packed_summary == padded_summary and packed_summary["samples_seen"] == 16


def test_pack_tokens_below_max_length_is_refused_at_configuration():
    source = SourceConfig(kind="instruct", path="x.json", image_root=".")
    with pytest.raises(ValueError, match=r"pack_tokens \(512\) must be >= data.max_length \(2048\)"):
        LlavaDataModule(train=[source], pack_tokens=512)


# -- two real processes (gloo) -------------------------------------------------------------------


class _IdEncoder:
    """Stands in for `SampleEncoder`: record `id` i becomes `3 + i % 4 * 5` tokens of id `100 + i`."""

    def __call__(self, conversations, images, where):
        i = int(where.split("id=")[1])
        n = 3 + i % 4 * 5
        ids = torch.full((n,), 100 + i)
        return {"input_ids": ids, "labels": ids.clone(), "pixel_values": torch.empty(0, 3, 4, 4)}

    def fail(self, reason, where, detail):
        return skip(reason, where, detail)


def _rank_main(rank, world, port, root):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    dataset = InstructionDataset(root / "records.json", root, _IdEncoder())
    collate = LlavaCollator(pad_token_id=0, pack_tokens=20)
    loader = DataLoader(dataset, batch_size=3, sampler=EpochSampler(len(dataset), seed=1), collate_fn=collate)
    ids, seen, rows, batches, skipped = [], 0, 0, 0, Counter()
    length = len(loader)  # while the process group is up (the sampler reads the world size)
    for batch in loader:
        flags = torch.tensor([1, 0])  # every rank joins each step (see test_multirank_data.py)
        dist.all_reduce(flags)
        assert flags.tolist() == [world, 0], "ranks out of step"
        batches += 1
        rows += len(batch["input_ids"])
        seen += batch["num_samples"]
        skipped += batch["skipped"]
        flat, starts = batch["input_ids"].flatten(), batch["cu_seqlens"][:-1].tolist()
        ids += [int(flat[s]) - 100 for s in starts if flat[s] != 0]  # first token of each sample
    flags = torch.tensor([0, 1])
    dist.all_reduce(flags)
    assert flags.tolist() == [0, world], "ranks out of step"
    dist.barrier()
    dist.destroy_process_group()
    result = {"ids": ids, "seen": seen, "rows": rows, "batches": batches, "len": length}
    (root / f"rank{rank}.json").write_text(json.dumps({**result, "skipped": dict(skipped)}))


def test_two_gloo_ranks_with_packing_stay_in_step_and_read_each_sample_once(tmp_path):
    records = [{"id": str(i), "conversations": []} for i in range(13)]  # 13: odd, one padding slot
    (tmp_path / "records.json").write_text(json.dumps(records))
    run_ranks(_rank_main, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["len"] == 3  # ceil(7 / 3)
    assert Counter(ranks[0]["ids"] + ranks[1]["ids"]) == Counter(range(13))
    assert [r["seen"] for r in ranks] == [len(r["ids"]) for r in ranks]
    assert sum(r["skipped"].get("padding", 0) for r in ranks) == 1
    assert sum(r["rows"] for r in ranks) < 13  # rows held several samples
