"""Generation (KV cache vs full rerun, left padding, sampling, EOS) and multiple-choice evaluation."""

import json

import pytest
import torch
from conftest import sample_ids
from PIL import Image

import llava_lightning.eval.multiple_choice as multiple_choice
import llava_lightning.inference.generate as text_generation
from llava_lightning import LlavaModel, generate
from llava_lightning.data.templates import get_template
from llava_lightning.eval import evaluate_multiple_choice, parse_letter
from llava_lightning.inference.generate import eos_ids_for
from llava_lightning.model.generation import generate_ids


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and spinning threads crawl on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(preset: str) -> LlavaModel:
    torch.manual_seed(0)  # module fixtures are built before the autouse seed: fix the weights here
    return LlavaModel.from_preset(preset).eval()


@pytest.fixture(scope="module")
def tiny():
    return _build("tiny")


@pytest.fixture(scope="module")
def qwen():
    return _build("tiny-qwen2")


def _left_pad(seqs, pad):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    return ids, mask


def _pixels(model, n):
    size = model.vision_tower.image_size
    return torch.randn(n, 3, size, size)


def _image(seed: int, size=(80, 56)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(data.numpy(), mode="RGB")


@pytest.fixture(scope="module")
def mixed_batch(tiny):
    """A left-padded batch of an image prompt (3 ids, the image span, 6 ids) and a text-only prompt 6 ids shorter."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    image_row = sample_ids(tiny, images=1, text=6)
    text_row = torch.randint(3, 900, (len(image_row) - 6,), generator=g)  # 6 ids shorter: left-padded
    ids, mask = _left_pad([image_row, text_row], tiny.tokenizer.pad_token_id)
    return [image_row, text_row], ids, mask, _pixels(tiny, 1)


def test_kv_cache_matches_full_rerun_on_left_padded_mixed_batch(tiny, mixed_batch):
    _, ids, mask, pixels = mixed_batch
    assert mask[1, 0] == 0 and mask[0].all()  # the text row is the padded one
    kwargs = dict(pixel_values=pixels, max_new_tokens=6, eos_token_ids=[])
    cached = generate_ids(tiny, ids, mask, use_cache=True, **kwargs)
    rerun = generate_ids(tiny, ids, mask, use_cache=False, **kwargs)
    assert cached.shape == (2, 6) and cached.dtype == torch.long
    torch.testing.assert_close(cached, rerun, rtol=0, atol=0)
    assert not (cached == tiny.image_token_id).any()


def test_left_padded_row_equals_row_alone(tiny, mixed_batch):
    rows, ids, mask, pixels = mixed_batch
    batch = generate_ids(tiny, ids, mask, pixel_values=pixels, max_new_tokens=6, eos_token_ids=[])
    alone_image = generate_ids(tiny, rows[0][None], pixel_values=pixels, max_new_tokens=6, eos_token_ids=[])
    alone_text = generate_ids(tiny, rows[1][None], max_new_tokens=6, eos_token_ids=[])
    torch.testing.assert_close(batch[0], alone_image[0], rtol=0, atol=0)
    torch.testing.assert_close(batch[1], alone_text[0], rtol=0, atol=0)


def test_max_new_tokens_and_mode_restored(tiny, mixed_batch):
    rows, *_ = mixed_batch
    ids = rows[1][None]
    seen = []
    hook = tiny.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    tiny.train()
    try:
        for n in (1, 3):
            assert generate_ids(tiny, ids, max_new_tokens=n, eos_token_ids=[]).shape == (1, n)
        assert generate_ids(tiny, ids, max_new_tokens=0).shape == (1, 0)
        assert tiny.training  # the previous mode is back
        assert seen and not any(seen)  # every forward ran in eval mode
    finally:
        hook.remove()
        tiny.eval()
    with pytest.raises(ValueError, match="LEFT-padded"):
        right_padded = torch.ones_like(ids)
        right_padded[0, -1] = 0
        generate_ids(tiny, ids, right_padded)


def test_sampling_is_reproducible_and_not_greedy(tiny):
    ids, mask = _left_pad([torch.arange(10, 22), torch.arange(30, 38)], tiny.tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=16, eos_token_ids=[])
    greedy = generate_ids(tiny, ids, mask, **kwargs)

    def sample(seed, **extra):
        g = torch.Generator().manual_seed(seed)
        return generate_ids(tiny, ids, mask, temperature=5.0, generator=g, **kwargs, **extra)

    first, again, other = sample(123), sample(123), sample(7)
    assert first.shape == greedy.shape == (2, 16)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, greedy)
    assert not torch.equal(first, other)
    # top-p so small that only the most likely token survives: sampling collapses to greedy.
    torch.testing.assert_close(sample(123, top_p=1e-9), greedy, rtol=0, atol=0)


def test_eos_stops_its_row_and_pads_after_it(tiny):
    pad = tiny.tokenizer.pad_token_id
    ids, mask = _left_pad([torch.arange(10, 22), torch.arange(40, 47)], pad)
    free = generate_ids(tiny, ids, mask, max_new_tokens=8, eos_token_ids=[])
    # Declare as EOS a token row 0 produces early and row 1 never produces: row 0 must stop there.
    candidates = [(k, t) for k, t in enumerate(free[0].tolist()[:6]) if t not in free[1].tolist()]
    assert candidates, f"rows share all tokens: {free.tolist()}"
    k, eos = candidates[0]
    for use_cache in (True, False):
        out = generate_ids(tiny, ids, mask, max_new_tokens=8, eos_token_ids=[eos], use_cache=use_cache)
        assert out.shape == (2, 8)  # row 1 has no EOS: generation runs to max_new_tokens
        first = free[0].tolist().index(eos)
        assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist()
        assert out[0, first + 1 :].tolist() == [pad] * (7 - first)
        assert out[1].tolist() == free[1].tolist()  # the other row is unaffected by the padding


def test_eos_everywhere_stops_at_once(tiny):
    """An lm_head bias that makes EOS win at every position: one step, EOS in each row, empty text."""
    head = tiny.language_model.get_output_embeddings()
    assert head.bias is None
    bias = torch.zeros(head.out_features)
    bias[tiny.tokenizer.eos_token_id] = 1e4
    head.bias = torch.nn.Parameter(bias)
    try:
        ids, mask = _left_pad([torch.arange(10, 22), torch.arange(40, 47)], tiny.tokenizer.pad_token_id)
        out = generate_ids(tiny, ids, mask, max_new_tokens=8)
        assert out.tolist() == [[tiny.tokenizer.eos_token_id]] * 2
        texts = generate(tiny, [None, _image(0)], ["Hi", "What colour is the shape?"], max_new_tokens=8)
        assert texts == ["", ""]
    finally:
        head.bias = None


def test_generate_builds_template_prompts_left_padded(tiny, monkeypatch):
    """`generate` hands generate_ids the template's generation prompt for each row, left-padded, and
    the images in order; the decoded text stops at EOS."""
    images = [None, _image(1), [_image(2), _image(3)]]
    prompts = ["Hi", "What colour is the shape?", "Which image has more shapes?"]
    captured = {}
    tok = tiny.tokenizer
    reply = tok("a red circle", add_special_tokens=False)["input_ids"]

    def fake(model, input_ids, attention_mask, pixel_values=None, **kwargs):
        captured.update(ids=input_ids, mask=attention_mask, pixels=pixel_values, **kwargs)
        row = reply + [tok.eos_token_id] + reply
        return torch.tensor([row] * input_ids.shape[0])

    monkeypatch.setattr(text_generation, "generate_ids", fake)
    out = generate(tiny, images, prompts, max_new_tokens=5)
    assert out == ["a red circle"] * 3
    template = get_template("vicuna_v1")
    n_tok = tiny.vision_tower.num_tokens
    for i, (entry, prompt) in enumerate(zip(images, prompts)):
        n = 0 if entry is None else 1 if isinstance(entry, Image.Image) else len(entry)
        conv = [{"from": "human", "value": "<image>\n" * n + prompt}]
        expected = template.encode(conv, tok, n_tok, num_images=n, add_generation_prompt=True)["input_ids"]
        length = int(captured["mask"][i].sum())
        assert captured["ids"][i, -length:].tolist() == expected
        assert (captured["ids"][i, :-length] == tok.pad_token_id).all()
    size = tiny.vision_tower.image_size
    assert captured["pixels"].shape == (3, 3, size, size)
    assert captured["max_new_tokens"] == 5 and captured["eos_token_ids"] == [tok.eos_token_id]


def test_generate_text_cache_matches_rerun_with_images(tiny):
    images = [_image(4), None]
    prompts = ["What colour is the shape?", "How many shapes are there?"]
    cached = generate(tiny, images, prompts, max_new_tokens=4)
    rerun = generate(tiny, images, prompts, max_new_tokens=4, use_cache=False)
    assert cached == rerun and all(isinstance(t, str) for t in cached)


def test_export_stops_engines_at_the_templates_end_of_turn(qwen, tmp_path):
    """`generation_config.json` gets the template's end-of-turn ids: with a tokenizer whose EOS is not
    ChatML's `<|im_end|>`, both; vicuna on the same tokenizer: the EOS alone."""
    from copy import deepcopy

    from transformers import GenerationConfig

    from llava_lightning.inference.generate import save_stop_tokens

    tok = deepcopy(qwen.tokenizer)
    tok.eos_token = "<|endoftext|>"
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert end != eos
    GenerationConfig(max_length=77).save_pretrained(tmp_path)
    assert save_stop_tokens(tmp_path, tok, "chatml") == [eos, end]
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.eos_token_id == [eos, end] and config.max_length == 77  # the rest kept
    save_stop_tokens(tmp_path, tok, "vicuna_v1")
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == eos


def test_qwen2_chatml_cache_matches_rerun(qwen):
    assert eos_ids_for(qwen.tokenizer, get_template("chatml")) == [
        qwen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    rows = [sample_ids(qwen, images=1, text=4), torch.randint(3, 900, (15,), generator=g)]
    ids, mask = _left_pad(rows, qwen.tokenizer.pad_token_id)
    pixels = _pixels(qwen, 1)
    kwargs = dict(pixel_values=pixels, max_new_tokens=5, eos_token_ids=[])
    cached = generate_ids(qwen, ids, mask, **kwargs)
    torch.testing.assert_close(
        cached, generate_ids(qwen, ids, mask, use_cache=False, **kwargs), rtol=0, atol=0
    )
    alone = generate_ids(qwen, rows[1][None], max_new_tokens=5, eos_token_ids=[])
    torch.testing.assert_close(cached[1], alone[0], rtol=0, atol=0)
    texts = generate(
        qwen, [None, _image(5)], ["Hi", "What shape is in the image?"], template="chatml", max_new_tokens=3
    )
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# ------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("B", 4, "B"),
        ("B.", 4, "B"),
        ("(B)", 4, "B"),
        ("The answer is B", 4, "B"),
        ("The answer is (C).", 4, "C"),
        ("Answer: D", 4, "D"),
        ("C) grass", 3, "C"),
        ("  A\n", 2, "A"),
        ("The answer is a bird, so C", 4, "C"),
        ("Bird", 4, None),
        ("B2", 4, None),
        ("E", 4, None),
        ("D", 3, None),
        ("", 4, None),
        ("b", 4, None),
        ("I think the answer is B", 4, "B"),
    ],
)
def test_parse_letter(text, n, expected):
    assert parse_letter(text, n) == expected


def _write_eval_set(tmp_path):
    """6 records: 4 with an image (3 or 4 options), 2 text-only; answers spread over A..D."""
    (tmp_path / "images").mkdir()
    options = [["red", "blue", "green"], ["one", "two", "three", "four"]]
    answers = "ABCDAB"
    records = []
    for i in range(6):
        opts = options[i % 2]
        answer = answers[i] if answers[i] < chr(ord("A") + len(opts)) else "A"
        question = f"What is shown in picture {i}?"
        text = question + "\n" + "\n".join(f"{chr(65 + k)}. {o}" for k, o in enumerate(opts))
        text += "\nAnswer with the option's letter from the given choices directly."
        record = {"id": f"q{i}", "answer_letter": answer, "options": opts}
        if i < 4:
            _image(10 + i, size=(40 + 10 * i, 48)).save(tmp_path / "images" / f"{i}.png")
            record["image"] = f"images/{i}.png"
            text = "<image>\n" + text
        record["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        records.append(record)
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    return path, records


def test_evaluate_multiple_choice_runs_the_model(tiny, tmp_path):
    path, records = _write_eval_set(tmp_path)
    result = evaluate_multiple_choice(tiny, path, tmp_path, batch_size=4, max_new_tokens=2)
    assert result["n"] == 6 and len(result["predictions"]) == 6
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == result["correct"] / 6
    assert result["chance"] == pytest.approx((3 * (1 / 3) + 3 * (1 / 4)) / 6)
    assert 0 <= result["unparsed"] <= 6
    assert [p["id"] for p in result["predictions"]] == [r["id"] for r in records]
    assert evaluate_multiple_choice(tiny, path, tmp_path, max_new_tokens=1, limit=2)["n"] == 2


def test_evaluate_multiple_choice_breaks_accuracy_down_by_a_record_field(tiny, tmp_path, monkeypatch):
    path, records = _write_eval_set(tmp_path)
    for i, r in enumerate(records):
        r["kind"] = "colour" if i % 2 == 0 else "count"  # 3-option and 4-option questions
    path.write_text(json.dumps(records))
    # Right on the colour questions (records 0, 2, 4), one letter off on the count questions.
    by_question = {r["conversations"][0]["value"].removeprefix("<image>\n"): r for r in records}

    def fake(model, images, prompts, **kwargs):
        out = []
        for prompt in prompts:
            r = by_question[prompt]
            shift = 0 if r["kind"] == "colour" else 1
            out.append(chr(65 + (ord(r["answer_letter"]) - 65 + shift) % len(r["options"])))
        return out

    monkeypatch.setattr(multiple_choice, "generate", fake)
    result = evaluate_multiple_choice(tiny, path, tmp_path, group_by="kind")
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["groups"] == {
        "colour": {"accuracy": 1.0, "n": 3, "correct": 3, "chance": pytest.approx(1 / 3)},
        "count": {"accuracy": 0.0, "n": 3, "correct": 0, "chance": pytest.approx(1 / 4)},
    }
    assert "groups" not in evaluate_multiple_choice(tiny, path, tmp_path)
    del records[3]["kind"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"record 'q3' has no 'kind' field"):
        evaluate_multiple_choice(tiny, path, tmp_path, group_by="kind")


def test_evaluate_multiple_choice_counts_correctly(tiny, tmp_path, monkeypatch):
    path, records = _write_eval_set(tmp_path)
    by_question = {r["conversations"][0]["value"].removeprefix("<image>\n"): r for r in records}
    calls = []

    def answering(shift, form="{}"):
        def fake(model, images, prompts, **kwargs):
            calls.append((images, prompts))
            out = []
            for prompt in prompts:
                r = by_question[prompt]  # the prompt arrives without its <image> line
                k = (ord(r["answer_letter"]) - 65 + shift) % len(r["options"])
                out.append(form.format(chr(65 + k)))
            return out

        return fake

    monkeypatch.setattr(multiple_choice, "generate", answering(0, "The answer is {}."))
    right = evaluate_multiple_choice(tiny, path, tmp_path, batch_size=4)
    assert right["accuracy"] == 1.0 and right["correct"] == 6 and right["unparsed"] == 0
    assert [len(p) for _, p in calls] == [4, 2]
    images = [im for batch, _ in calls for im in batch]
    assert [len(im) if im else 0 for im in images] == [1, 1, 1, 1, 0, 0]
    assert images[1][0].size == (50, 48) and images[1][0].mode == "RGB"

    monkeypatch.setattr(multiple_choice, "generate", answering(1))
    wrong = evaluate_multiple_choice(tiny, path, tmp_path)
    assert wrong["accuracy"] == 0.0 and wrong["unparsed"] == 0

    monkeypatch.setattr(
        multiple_choice, "generate", lambda model, images, prompts, **kw: ["no idea"] * 3 + ["B"] * 3
    )
    mixed = evaluate_multiple_choice(tiny, path, tmp_path)
    # records 3..5 have answers D, A, B: "B" is right for record 5 only
    assert mixed["unparsed"] == 3 and mixed["correct"] == 1
    assert mixed["accuracy"] == pytest.approx(1 / 6)
