"""Templates: exact strings from LLaVA's conversation.py, and labels that decode to exactly the assistant replies."""

import pytest

from llava_lightning.data.templates import (
    LLAMA_2_SYSTEM,
    VICUNA_SYSTEM,
    SampleError,
    get_template,
)
from llava_lightning.model.language_model import add_image_token

CONV = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "In the top left corner."},
    {"from": "human", "value": "How many shapes?"},
    {"from": "gpt", "value": "Two."},
]
ANSWERS = ["A red circle.", "In the top left corner.", "Two."]


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(llama2_tokenizer_dir, add_bos_token=True)  # as Vicuna v1.5
    add_image_token(tok)
    return tok


@pytest.fixture(scope="module")
def chatml(tiny_chatml):
    return tiny_chatml


def test_vicuna_v1_renders_llavas_format_character_for_character():
    conv = CONV[:4]
    text = get_template("vicuna_v1").render(conv)
    expected = (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A red circle.</s>"
        "USER: Where is it? ASSISTANT: In the top left corner.</s>"
    )
    assert text == expected
    prompt = get_template("vicuna_v1").render(conv[:3], add_generation_prompt=True)
    assert prompt.endswith("USER: Where is it? ASSISTANT:")


def test_llama_2_and_chatml_render_their_formats():
    text = get_template("llama_2").render(CONV[:4])
    assert text == (
        f"[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A red circle. </s>"
        "<s>[INST] Where is it? [/INST] In the top left corner. </s>"
    )
    chat = get_template("chatml").render(CONV[:2])
    assert chat.endswith(
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
    )
    assert chat.startswith("<|im_start|>system\n")


def _supervised_runs(enc):
    runs, current = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != -100:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


MARKERS = {
    "vicuna_v1": "{eos}",
    "llava_v1": "{eos}",
    "llama_2": " {eos}",
    "chatml": "<|im_end|>",
    "auto": "{eos}",
}


# `auto` needs a tokenizer with a chat template: only the ChatML one has it.
CASES = [(t, n) for t in ["llama2", "chatml", "tiny_llama"] for n in MARKERS if n != "auto" or t == "chatml"]


@pytest.mark.parametrize("tok_name,name", CASES)
def test_supervised_tokens_decode_to_exactly_the_replies(request, tok_name, name):
    tok = request.getfixturevalue(tok_name)
    enc = get_template(name).encode(CONV, tok, num_image_tokens=5)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert enc["input_ids"].count(tok.convert_tokens_to_ids("<image>")) == 5
    runs = _supervised_runs(enc)
    assert len(runs) == len(ANSWERS)
    marker = MARKERS[name].format(eos=tok.eos_token)
    for run, answer in zip(runs, ANSWERS):
        assert tok.decode(run).strip() == (answer + marker).strip()
    if tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id:
        assert enc["input_ids"][0] == tok.bos_token_id and enc["labels"][0] == -100


@pytest.mark.parametrize("tok_name", ["llama2", "chatml"])
def test_plain_supervises_caption_and_newline_only(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A blue star."}]
    enc = get_template("plain").encode(conv, tok, num_image_tokens=4, num_images=1)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc["input_ids"].count(image_id) == 4
    (run,) = _supervised_runs(enc)
    assert tok.decode(run) == "A blue star.\n"
    assert all(lab == -100 for i, lab in zip(enc["input_ids"], enc["labels"]) if i == image_id)


def test_two_images_move_to_the_front_of_their_turn(chatml):
    conv = [
        {"from": "human", "value": "Compare <image> and <image> please"},
        {"from": "gpt", "value": "Same."},
    ]
    text = get_template("vicuna_v1").render(conv)
    assert "USER: <image>\n<image>\nCompare  and  please ASSISTANT:" in text
    enc = get_template("vicuna_v1").encode(conv, chatml, num_image_tokens=3, num_images=2)
    assert enc["input_ids"].count(chatml.convert_tokens_to_ids("<image>")) == 6


def test_generation_prompt_is_the_training_prefix(chatml):
    template = get_template("vicuna_v1")
    full = template.encode(CONV[:2], chatml, num_image_tokens=2)
    prompt = template.encode(CONV[:1], chatml, num_image_tokens=2, add_generation_prompt=True)
    n = len(prompt["input_ids"])
    assert full["input_ids"][:n] == prompt["input_ids"]
    assert all(lab == -100 for lab in full["labels"][:n]) and full["labels"][n] != -100


@pytest.mark.parametrize(
    "conv,kwargs,reason",
    [
        ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], {}, "bad_turn_order"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], {}, "bad_turn_order"),
        (
            [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            {"num_images": 2},
            "image_count_mismatch",
        ),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            {"num_images": 1},
            "image_count_mismatch",
        ),
        ([], {}, "empty_conversation"),
        ([{"from": "human", "value": "q"}], {}, "no_assistant_reply"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], {}, "malformed_record"),
    ],
)
def test_bad_samples_raise_sample_error_with_reason(chatml, conv, kwargs, reason):
    with pytest.raises(SampleError) as info:
        get_template("vicuna_v1").encode(conv, chatml, num_image_tokens=3, **kwargs)
    assert info.value.reason == reason


def test_max_length_cutting_an_image_or_every_reply_is_a_skip_never_all_ignored(chatml):
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a long answer here"}]
    template = get_template("plain")
    with pytest.raises(SampleError) as info:
        template.encode(conv, chatml, num_image_tokens=10, max_length=5)
    assert info.value.reason == "image_truncated"
    with pytest.raises(SampleError) as info:
        template.encode(conv, chatml, num_image_tokens=10, max_length=10)
    assert info.value.reason == "no_supervised_tokens"
    enc = template.encode(conv, chatml, num_image_tokens=10, max_length=12)
    assert len(enc["input_ids"]) == 12 and any(lab != -100 for lab in enc["labels"])


def test_unknown_template_lists_choices():
    with pytest.raises(ValueError, match="vicuna_v1"):
        get_template("vicuna")
