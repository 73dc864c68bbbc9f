"""The `make bench` parts' behaviour at tiny settings (their timings are reported, never asserted)."""

import re
import statistics

import pytest
import torch

from llava_lightning.batch import IGNORE_INDEX
from llava_lightning.bench import packing
from llava_lightning.model import get_preset


def _samples_of(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids, labels) of each real sample of a padded or packed batch, sorted. A packed sample's first
    label is IGNORE_INDEX (the boundary rule), so first labels are left out of the comparison."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    if "cu_seqlens" not in batch:
        rows = [(ids[r][mask[r]], labels[r][mask[r]]) for r in range(len(ids))]
    else:
        bounds = batch["cu_seqlens"].tolist()
        flat_ids, flat_labels, flat_mask = ids.reshape(-1), labels.reshape(-1), mask.reshape(-1)
        rows = [(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(bounds, bounds[1:]) if flat_mask[a:b].all()]
    return sorted((tuple(i.tolist()), tuple(lab[1:].tolist())) for i, lab in rows)


@pytest.fixture(scope="module")
def tiny_run():
    return packing.run(get_preset("tiny"), batch=6, steps=2, warmup=0, seed=0)


def test_packing_bench_arms_process_the_same_samples_and_tokens(tiny_run):
    r = tiny_run
    assert len(r["batches"]) == 2
    for padded, packed in r["batches"]:
        assert "position_ids" in packed and "position_ids" not in padded
        assert _samples_of(padded) == _samples_of(packed)
        assert len(_samples_of(padded)) == 6 == packed["num_samples"]
        assert int(padded["attention_mask"].sum()) == int(packed["attention_mask"].sum())
        # Images: one per image sample, the same count in both arms.
        assert len(padded["pixel_values"]) == len(packed["pixel_values"])
    assert r["padded"]["real_tokens"] == r["packed"]["real_tokens"] > 0
    assert r["padded"]["supervised"] == r["packed"]["supervised"] > 0
    # Packing: by default each batch is one row of all its samples (pack_tokens = batch x max_length),
    # with no padding at all, under llava_varlen; the padded arm runs sdpa.
    assert r["pack_tokens"] == 6 * r["max_length"]
    assert r["packed"]["rows"] == 1 < r["padded"]["rows"] == 6
    assert r["packed"]["pad_share"] == 0 < r["padded"]["pad_share"]
    assert r["attention"] == ("sdpa", "llava_varlen")
    for padded, packed in r["batches"]:
        assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert r["positions_ratio"] == pytest.approx(1 / (1 - r["padded"]["pad_share"]))
    assert r["padded"]["tokens_per_s"] > 0 and r["packed"]["tokens_per_s"] > 0 and r["ratio"] > 0


def test_packing_bench_line_format(tiny_run):
    line = packing.format_line(tiny_run)
    pattern = (
        r"^\[packing\] LLaVA-665K-like mix scaled 9/576 \(max_length 32\), \d+M params, \d+ threads, "
        r"batch 6, 2 timed steps: padded \(sdpa\) \d+ tok/s \(pad \d+\.\d%, 6\.0 rows/step\), "
        r"packed \(pack_tokens 192, llava_varlen\) \d+ tok/s \(pad 0\.0%, 1\.0 rows/step\), "
        r"ratio \d+\.\d\d \(goal >= 1\.5; positions padded / packed \d+\.\d\d\); "
        r"the mix over 20000 samples at full scale: pad \d+\.\d% / \d+\.\d%, positions ratio \d+\.\d\d$"
    )
    assert re.match(pattern, line), line


def test_packing_bench_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        packing.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--batch", "--pack-tokens", "--attention", "--seed", "--warmup", "--threads"):
        assert option in out


def test_the_length_mix_is_llava_665k_like_and_scaling_keeps_its_padding():
    mixes = packing.full_scale_lengths(4000, seed=1)
    text_only = [m for m in mixes if not m.image]
    assert 0.05 < len(text_only) / len(mixes) < 0.07  # 40K of 665K
    image_text = [m.text for m in mixes if m.image]
    assert 105 < statistics.median(image_text) < 135 and max(image_text) <= 1400 and min(image_text) >= 20
    full = [m.text + (576 if m.image else 0) for m in mixes]
    assert max(full) <= 2048
    # Scaled to 64 image tokens (1/9): the padded and packed shares stay within 1.5 points of full scale
    # (rows of max_length; one row per batch has no padding at any scale).
    samples = packing.make_samples(mixes, 64, image_token_id=1320, image_size=4)
    scaled = [len(s["input_ids"]) for s in samples]
    assert max(scaled) <= packing.scaled_max_length(64) == 228
    full_shares = packing.fill(full, 2048, 16)
    scaled_shares = packing.fill(scaled, 228, 16)
    for f, s in zip(full_shares, scaled_shares):
        assert abs(f - s) < 0.015, (full_shares, scaled_shares)
    assert full_shares[1] < full_shares[0]
    # Each sample: BOS, its image span, text with the second half supervised; no image id in the text.
    for mix, s in zip(mixes[:50], samples[:50]):
        ids, labels = s["input_ids"], s["labels"]
        assert ids[0] == 1 and int((ids == 1320).sum()) == (64 if mix.image else 0)
        assert len(s["pixel_values"]) == int(mix.image) and s["pixel_values"].dtype == torch.uint8
        text = len(ids) - (64 if mix.image else 0)
        assert int((labels != IGNORE_INDEX).sum()) == text // 2
        assert (labels[: len(ids) - text // 2] == IGNORE_INDEX).all()
