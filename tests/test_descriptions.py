"""The free-form description check (`eval/descriptions.py`) on a synthetic held-out set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_lightning import LlavaModel
from llava_lightning.data import synthetic
from llava_lightning.eval import descriptions
from llava_lightning.eval.descriptions import evaluate_descriptions, single_shape_records

COLOURS, SHAPES = tuple(synthetic.COLOURS), synthetic.SHAPES


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("eval")
    synthetic.write_eval(root, 0, 24, 48, files={"fixed": "fixed.json"})
    return root, json.loads((root / "fixed.json").read_text())


def _replying(chosen: list[dict], reply, calls: list):
    """A `generate` stand-in answering `reply(scene_shape)` for the records in evaluation order."""
    queue = list(chosen)

    def fake(model, images, prompts, **kwargs):
        calls.append((len(images), set(prompts)))
        return [reply(queue.pop(0)["scene"][0]) for _ in images]

    return fake


def test_single_shape_records_one_shape_each_image_once(held_out):
    _, records = held_out
    chosen = single_shape_records(records + records[:3])
    assert [r["id"] for r in chosen] == [r["id"] for r in records if len(r["scene"]) == 1]
    assert 0 < len(chosen) < len(records)  # count questions show 1-3 shapes


def test_descriptions_scored_by_first_colour_and_shape(held_out, monkeypatch):
    root, records = held_out
    chosen = single_shape_records(records)
    n = len(chosen)
    other = {c: COLOURS[(COLOURS.index(c) + 1) % len(COLOURS)] for c in COLOURS}
    cases = {
        "right": (lambda s: f"A {s['colour']} {s['shape']} in the {s['position']}.", 1.0, 1.0, 1.0),
        "wrong colour": (lambda s: f"A {other[s['colour']]} {s['shape']}.", 0.0, 0.0, 1.0),
        # The first colour named counts, not any colour in the reply.
        "right one second": (
            lambda s: f"A {other[s['colour']]} {s['shape']} and a {s['colour']} one.",
            0.0,
            0.0,
            1.0,
        ),
        "case": (lambda s: f"{s['colour'].upper()} {s['shape'].title()}", 1.0, 1.0, 1.0),
        "nothing": (lambda s: "I see a picture.", 0.0, 0.0, 0.0),
    }
    for name, (reply, both, colour, shape) in cases.items():
        calls = []
        monkeypatch.setattr(descriptions, "generate", _replying(chosen, reply, calls))
        got = evaluate_descriptions(None, records, root, COLOURS, SHAPES, batch_size=5)
        assert (got["n"], got["accuracy"], got["colour"], got["shape"]) == (n, both, colour, shape), name
        assert [c[0] for c in calls] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
        assert all(c[1] == {descriptions.DESCRIBE_PROMPT} for c in calls)
    # Half right: every other record gets the wrong shape.
    flip = iter(range(n))
    monkeypatch.setattr(
        descriptions,
        "generate",
        _replying(chosen, lambda s: f"a {s['colour']} {s['shape'] if next(flip) % 2 else 'blob'}", []),
    )
    got = evaluate_descriptions(None, records, root, COLOURS, SHAPES)
    assert got["accuracy"] == pytest.approx((n // 2) / n) and got["colour"] == 1.0


def test_descriptions_run_the_model_and_need_scenes(held_out):
    root, records = held_out
    torch.manual_seed(0)
    model = LlavaModel.from_preset("tiny").eval()
    got = evaluate_descriptions(model, records[:8], root, COLOURS, SHAPES, max_new_tokens=3)
    assert got["n"] == len(single_shape_records(records[:8])) and 0.0 <= got["accuracy"] <= 1.0
    assert len(got["examples"]) == min(6, got["n"]) and all(
        isinstance(e["reply"], str) for e in got["examples"]
    )
    bare = [{k: v for k, v in r.items() if k != "scene"} for r in records]
    with pytest.raises(ValueError, match="one-shape `scene`"):
        evaluate_descriptions(model, bare, root, COLOURS, SHAPES)
