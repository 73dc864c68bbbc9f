"""Exports that serving engines load (`data/chat_template.py`, `hf_interop.build_hf_processor`): each
template's Jinja renders our prompt string and token ids, the exported processor pads images as training
did (pixel for pixel), and transformers' `apply_chat_template` + `generate` on an exported folder repeats
our greedy reply token for token."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lightning import LlavaModel
from llava_lightning.data.chat_template import jinja_chat_template
from llava_lightning.data.image import ImageTransform
from llava_lightning.data.templates import get_template
from llava_lightning.inference.chat import Message, Sampling, stream_reply

Q = "What is in the picture?"


def _image(seed, w, h):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


CONVERSATIONS = {
    "one image": [_user(Q, 1)],
    "text only, string content": [{"role": "user", "content": "Name a colour. "}],
    "multi-turn, images at two turns": [
        _user(" Describe both. ", 2),
        _assistant("A red square and a blue circle."),
        _user("And now?"),
        _assistant("Nothing else."),
        _user("This one?", 1),
    ],
    "system message": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
        _user(Q, 1),
    ],
    "empty system": [{"role": "system", "content": ""}, _user(Q, 1), _assistant("A cat."), _user("Sure?")],
}


def _ours(messages):
    """The same conversation as `inference.chat.encode_messages` hands it to our encoder."""
    conversation = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        images = sum(p["type"] == "image" for p in parts)
        role = {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]]
        conversation.append({"from": role, "value": "<image>\n" * images + text})
    return conversation


_TEMPLATES = [
    ("vicuna_v1", "tiny_llama"),
    ("llava_v1", "tiny_llama"),
    ("llama_2", "tiny_llama"),
    ("plain", "tiny_llama"),
    ("chatml", "tiny_chatml"),
    ("llama3", "tiny_chatml"),  # strings only: the tiny vocabulary lacks Llama-3's header tokens
]


@pytest.mark.parametrize(
    "template,tokenizer,conversation",
    [
        (t, tok, c)
        for t, tok in _TEMPLATES
        for c in CONVERSATIONS
        if t != "plain" or c == "one image"  # plain (stage 1) has one image-only turn
    ],
)
def test_the_jinja_template_renders_our_prompt_and_ids(template, tokenizer, conversation, request):
    tok = request.getfixturevalue(tokenizer)
    messages = CONVERSATIONS[conversation]
    jinja = jinja_chat_template(template, tok.bos_token, tok.eos_token)
    rendered = tok.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
    )
    ours = get_template(template)
    expected = ours.render(_ours(messages), add_generation_prompt=True)
    expected = expected.replace("</s>", tok.eos_token).replace("<s>", tok.bos_token or "")
    assert rendered == expected
    if template == "llama3":
        return
    # As transformers' processor tokenizes it (special tokens added: the template writes no BOS).
    ids = tok(rendered)["input_ids"]
    assert ids == ours.encode(_ours(messages), tok, 1, add_generation_prompt=True)["input_ids"]


def test_auto_keeps_the_tokenizers_own_template():
    assert jinja_chat_template("auto", "<s>", "</s>") is None


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_the_exported_processor_pads_to_square_as_training_does(tower):
    from llava_lightning.model.hf_interop import build_hf_processor

    preset = "tiny" if tower == "clip" else "tiny-siglip"
    model = LlavaModel.from_preset(preset)
    processor = build_hf_processor(model, "pad").image_processor
    ours = ImageTransform.from_tower(model.vision_tower, "pad")
    for i, (w, h) in enumerate([(140, 90), (90, 140), (97, 33), (64, 64), (31, 200), (17, 16), (500, 301)]):
        image = _image(i, w, h)
        raw = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt").pixel_values[
            0
        ]
        assert torch.equal(raw.round().to(torch.uint8), ours.to_uint8(image)), (w, h)
        theirs = processor(images=image, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(theirs, ours(image), rtol=0, atol=1e-6)
    # square models keep the CLIP processor without padding
    assert not getattr(build_hf_processor(model, "square").image_processor, "do_pad", False)


def theirs_eos(folder) -> list[int]:
    from transformers import GenerationConfig

    ids = GenerationConfig.from_pretrained(folder).eos_token_id
    return ids if isinstance(ids, list) else [ids]


def test_transformers_on_the_export_repeats_our_greedy_reply(tiny_stage2_ckpt, tmp_path):
    """`export` a trained checkpoint; transformers' processor (chat template, padding) + `generate` give
    the new token ids of our greedy reply, with a non-square image, over two turns."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from llava_lightning.cli import main
    from llava_lightning.inference.chat import encode_messages
    from llava_lightning.model.generation import generate_ids
    from llava_lightning.module import LlavaLitModule

    out = tmp_path / "hf"
    main(["export", "--ckpt_path", str(tiny_stage2_ckpt), "--out", str(out)])
    lit = LlavaLitModule.load_from_checkpoint(tiny_stage2_ckpt, map_location="cpu", weights_only=True)
    assert (lit.template, lit.image_aspect) == ("vicuna_v1", "pad")
    ours = lit.model.eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.do_pad and processor.chat_template
    assert AutoTokenizer.from_pretrained(out).chat_template == processor.chat_template
    assert theirs_eos(out) == [
        lit.model.tokenizer.eos_token_id
    ]  # generation_config.json: vicuna stops at EOS
    theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()

    first, second = _image(1, 150, 90), _image(2, 60, 110)
    ask = [Message("user", "What shape is this?", [first])]
    turns = [_user("What shape is this?", 1)]
    reply = ""  # the first turn's, set at the end of step 0
    for step in range(2):
        if step == 1:
            ask += [Message("assistant", reply), Message("user", "And this one?", [second])]
            turns += [_assistant(reply), _user("And this one?", 1)]
        prompt = encode_messages(ours, ask, lit.template, lit.image_aspect)
        # Past the EOS too (the image token stops neither side): 8 tokens to compare, not just an early EOS.
        expected = generate_ids(
            ours, prompt.input_ids, pixel_values=prompt.pixel_values, max_new_tokens=8,
            eos_token_ids=[ours.image_token_id],
        )[0].tolist()  # fmt: skip
        text = processor.apply_chat_template(turns, add_generation_prompt=True)
        inputs = processor(images=[first, second][: step + 1], text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt.input_ids[0].tolist()
        torch.testing.assert_close(inputs["pixel_values"], prompt.pixel_values, rtol=0, atol=1e-6)
        with torch.no_grad():
            new = theirs.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=ours.image_token_id,
                min_new_tokens=8,
            )
        got = new[0, inputs["input_ids"].shape[1] :].tolist()
        assert got == expected and len(got) == 8
        # The reply as the chat streams it: the same tokens up to the first end-of-turn.
        reply = "".join(stream_reply(ours, ask, lit.template, lit.image_aspect, Sampling(8, temperature=0.0)))
        ended = [i for i, t in enumerate(got) if t in prompt.eos_ids]
        assert reply == processor.decode(got[: ended[0] if ended else 8], skip_special_tokens=True).strip()
