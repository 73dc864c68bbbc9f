"""Chat (`inference/chat.py`): streamed replies equal `generate`'s, multi-turn prompts carry every turn and
image in order, and a consumer that stops reading stops the generation."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lightning import LlavaModel
from llava_lightning.inference.chat import (
    ChatSession,
    Message,
    Sampling,
    _IncrementalDecoder,
    encode_messages,
    stream_reply,
)
from llava_lightning.inference.generate import generate

GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


def _image(seed, w=96, h=96):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlavaModel.from_preset("tiny").eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
def test_a_streamed_greedy_reply_is_generates_reply(preset):
    torch.manual_seed(0)
    model = LlavaModel.from_preset(preset).eval()
    image = _image(1, 140, 90)
    for images, text in [([image], "What colour is the circle?"), ([], "Name a colour.")]:
        pieces = list(stream_reply(model, [Message("user", text, images)], "vicuna_v1", "pad", GREEDY))
        expected = generate(
            model, [images or None], [text], template="vicuna_v1", max_new_tokens=12, aspect="pad"
        )[0]
        assert "".join(pieces) == expected
        assert len(pieces) > 1 or len(expected.split()) <= 1  # streamed, not one block


def test_multi_turn_prompt_holds_every_turn_and_image_in_order(tiny):
    first, second = _image(1), _image(2)
    session = ChatSession(tiny, "vicuna_v1", "pad")
    session.ask("What is this?", [first])
    reply = "".join(session.stream(GREEDY))
    assert session.messages[-1] == Message("assistant", reply)
    session.ask("And this one?", [second])
    prompt = encode_messages(tiny, session.messages, "vicuna_v1", "pad")
    ids = prompt.input_ids[0].tolist()
    n = tiny.vision_tower.num_tokens
    assert ids.count(tiny.image_token_id) == 2 * n and prompt.pixel_values.shape[0] == 2
    # Each image's tower input, in the order of the turns.
    from llava_lightning.data.image import ImageTransform

    transform = ImageTransform.from_tower(tiny.vision_tower, "pad")
    assert torch.equal(prompt.pixel_values[0], transform(first)) and torch.equal(
        prompt.pixel_values[1], transform(second)
    )
    text = tiny.tokenizer.decode([i for i in ids if i != tiny.image_token_id])
    assert text.index("What is this?") < text.index("ASSISTANT:") < text.index("And this one?")
    assert text.rstrip().endswith("ASSISTANT:") and text.count("</s>") == 1  # the first reply's end
    assert "".join(session.stream(GREEDY)) == "".join(
        stream_reply(tiny, session.messages[:-1], "vicuna_v1", "pad", GREEDY)
    )


def test_stopping_the_stream_stops_generation(tiny, monkeypatch):
    calls = []
    forward = tiny.forward
    monkeypatch.setattr(tiny, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    never_ends = Sampling(max_new_tokens=400, temperature=1.0, seed=0)
    stream = stream_reply(tiny, [Message("user", "Describe it.")], "vicuna_v1", "pad", never_ends)
    next(stream)
    stream.close()  # joins the worker: it has stopped
    assert len(calls) < 10


def test_the_incremental_decoder_waits_for_whole_characters(tiny_llama):
    text = "a ☃ and é done"
    ids = tiny_llama(text, add_special_tokens=False).input_ids
    decoder = _IncrementalDecoder(tiny_llama, {tiny_llama.eos_token_id})
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert decoder.add(tiny_llama.eos_token_id) == "" and decoder.ended


def test_bad_conversations_are_refused(tiny):
    with pytest.raises(ValueError, match="end with a user turn"):
        encode_messages(tiny, [Message("user", "hi"), Message("assistant", "hello")])
    with pytest.raises(ValueError, match="only come first"):
        encode_messages(tiny, [Message("user", "hi"), Message("system", "be brief")])
