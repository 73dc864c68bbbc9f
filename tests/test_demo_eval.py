"""The demo's held-out evaluation (demo.py `held_out_multiple_choice`) runs through the `evaluate`
command's path: LLaVA-format answers and a results.json per set and model, a table of them, and the same
scores as `evaluate_multiple_choice` (the library call) on the same model and file."""

from __future__ import annotations

import json

import pytest
import torch

from llava_lightning.data.synthetic import EVAL_FILES
from llava_lightning.demo import held_out_multiple_choice
from llava_lightning.eval import evaluate_multiple_choice
from llava_lightning.model import LlavaModel


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and spinning threads crawl on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_held_out_set_goes_through_evaluate(shapes_dir, tmp_path):
    torch.manual_seed(0)
    models = {"before": LlavaModel.from_preset("tiny").eval(), "after": LlavaModel.from_preset("tiny").eval()}
    eval_root = shapes_dir / "eval"
    scores = held_out_multiple_choice(models, eval_root, tmp_path / "eval")
    assert set(scores) == set(EVAL_FILES) and all(set(s) == {"before", "after"} for s in scores.values())
    for order, name in EVAL_FILES.items():
        records = json.loads((eval_root / name).read_text())
        for when in ("before", "after"):
            run = tmp_path / "eval" / f"{order}-{when}"
            results = json.loads((run / "results.json").read_text())
            answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
            assert results["task"] == "multiple_choice" and results["metrics"] == scores[order][when]
            assert results["counts"] == {"questions": len(records), "answered": len(records), "skipped": {}}
            assert [a["question_id"] for a in answers] == [r["id"] for r in records]
            assert {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(answers[0])
            assert set(scores[order][when]["groups"]) == {r["question_type"] for r in records}
    # The library call on the same model and file gives the same scores (greedy: same replies).
    reference = evaluate_multiple_choice(
        models["after"], eval_root / EVAL_FILES["fixed"], eval_root, group_by="question_type"
    )
    reference.pop("predictions")
    assert scores["fixed"]["after"] == reference
    table = (tmp_path / "eval" / "table.md").read_text().splitlines()
    assert table[0] == "| Model | held-out MC |" and len(table) == 2 + 4
    assert table[2].startswith("| before stage 2, ") and "options |" in table[2]
