"""Token ids against two references: LLaVA's own `preprocess_*` and the tokenizer on the whole prompt.

1. LLaVA (training): our `input_ids` and `labels` equal those of LLaVA's `preprocess_plain`,
   `preprocess_v1` and `preprocess_llama_2` (ported below), prompt and supervised tokens alike, with
   one documented exception: LLaVA tokenizes the text after each `<image>` as a fresh chunk, so a
   chunk that starts with `\\n` begins with a lone `▁` (id 29871) that the tokenizer on the whole
   string does not give; those are removed from LLaVA's ids (and their label positions) before the
   comparison. In `plain` the caption after the image is such a fresh chunk too: it starts `▁a`.
2. Inference: a chat prompt's ids (`add_generation_prompt=True`) equal
   `tokenizer(template.render(conv, add_generation_prompt=True))` with each `<image>` expanded to
   `num_image_tokens` image ids, first token included; a chat template's training ids equal the same
   for the rendered conversation.

Tokenizers: the real Llama-2/Vicuna SentencePiece model (../shared/fixtures/llama2-tokenizer) loaded
with transformers 5's `LlamaTokenizer` (tokenizers-backed; `LlamaTokenizerFast` is the same class),
`add_bos_token=True` as Vicuna v1.5, `legacy=False` (the default, and Vicuna v1.5's setting):
Metaspace with `prepend_scheme="first"`, so only the very start of a string gets the `▁` dummy
prefix, never text after a special token. Plus the offline `tiny:llama` (the same Metaspace scheme)
and `tiny:chatml` (byte-level BPE, no dummy prefix: a start and a continuation tokenize alike).
"""

from __future__ import annotations

import copy
import dataclasses
from enum import Enum, auto

import pytest
import torch

from llava_lightning.data.templates import get_template
from llava_lightning.model.language_model import add_image_token

N_IMG = 3  # image ids per <image> in our encoding

MULTI_TURN = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "In the top left corner."},
    {"from": "human", "value": "How many shapes?"},
    {"from": "gpt", "value": "two."},
]
TEXT_ONLY = [
    {"from": "human", "value": "What colour is the sky on a clear day?"},
    {"from": "gpt", "value": "blue."},
    {"from": "human", "value": "And grass?"},
    {"from": "gpt", "value": "Green."},
]
MULTI_IMAGE = [
    {"from": "human", "value": "Compare <image> and <image>: which has more shapes?"},
    {"from": "gpt", "value": "the second one."},
    {"from": "human", "value": "What colour are they?"},
    {"from": "gpt", "value": "Both are red."},
]
PLAIN_ONE = [
    {"from": "human", "value": "<image>\nDescribe the image."},
    {"from": "gpt", "value": "a blue star in the top left corner."},
]
PLAIN_TWO = [
    {"from": "human", "value": "<image>\n<image>\nDescribe."},
    {"from": "gpt", "value": "two red circles."},
]
CHAT_SAMPLES = {"multi_turn": MULTI_TURN, "text_only": TEXT_ONLY, "multi_image": MULTI_IMAGE}
PLAIN_SAMPLES = {"plain_one_image": PLAIN_ONE, "plain_two_images": PLAIN_TWO}


# ------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir):
    """Ours: Vicuna v1.5's tokenizer as llava_lightning builds it (`<image>` and `<pad>` added)."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    assert LlamaTokenizerFast is LlamaTokenizer  # transformers 5: one tokenizers-backed class
    tok = LlamaTokenizer.from_pretrained(llama2_tokenizer_dir, add_bos_token=True)
    assert tok.legacy is False, "these tests state legacy=False (Vicuna v1.5, transformers 5 default)"
    add_image_token(tok)
    return tok


@pytest.fixture(scope="module")
def llava_tokenizer(llama2_tokenizer_dir):
    """LLaVA's: the same model loaded as `llava/train/train.py` does for v1 (pad = unk, no `<image>`)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(
        llama2_tokenizer_dir, add_bos_token=True, model_max_length=2048, padding_side="right"
    )
    assert tok.legacy is False
    tok.pad_token = tok.unk_token
    return tok


# ---------------------------------------------------------------------------- LLaVA's reference
# Ported from haotian-liu/LLaVA (commit c121f0432da27facab705978f83c4ada465e46fd):
# `tokenizer_image_token` from llava/mm_utils.py; `preprocess_multimodal`, `preprocess_plain`,
# `preprocess_v1`, `preprocess_llama_2` from llava/train/train.py; `Conversation.get_prompt` (styles
# TWO, LLAMA_2, PLAIN) and the conversation objects from llava/conversation.py; constants from
# llava/constants.py. Kept line for line; the only changes are marked DEVIATION.
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
IS_TOKENIZER_GREATER_THAN_0_14 = True  # tokenizers >= 0.14 here


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


@dataclasses.dataclass
class Conversation:
    system: str
    roles: list
    messages: list
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str = None
    version: str = "Unknown"

    def get_prompt(self):
        messages = self.messages
        if self.sep_style == SeparatorStyle.TWO:
            seps = [self.sep, self.sep2]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += role + ": " + message + seps[i % 2]
                else:
                    ret += role + ":"
        elif self.sep_style == SeparatorStyle.LLAMA_2:
            wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg  # noqa: E731
            wrap_inst = lambda msg: f"[INST] {msg} [/INST]"  # noqa: E731
            ret = ""
            for i, (role, message) in enumerate(messages):
                if i == 0:
                    assert message, "first message should not be none"
                    assert role == self.roles[0], "first message should come from user"
                if message:
                    if i == 0:
                        message = wrap_sys(self.system) + message
                    if i % 2 == 0:
                        message = wrap_inst(message)
                        ret += self.sep + message
                    else:
                        ret += " " + message + " " + self.sep2
                else:
                    ret += ""
            ret = ret.lstrip(self.sep)
        elif self.sep_style == SeparatorStyle.PLAIN:
            seps = [self.sep, self.sep2]
            ret = self.system
            for i, (role, message) in enumerate(messages):  # noqa: B007 (verbatim)
                if message:
                    ret += message + seps[i % 2]
                else:
                    ret += ""
        else:
            raise ValueError(f"Invalid style: {self.sep_style}")
        return ret

    def append_message(self, role, message):
        self.messages.append([role, message])

    def copy(self):
        return Conversation(
            system=self.system,
            roles=self.roles,
            messages=[[x, y] for x, y in self.messages],
            offset=self.offset,
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            version=self.version,
        )


CONV_TEMPLATES = {
    "vicuna_v1": Conversation(
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        roles=("USER", "ASSISTANT"),
        version="v1",
        messages=(),
        offset=0,
        sep_style=SeparatorStyle.TWO,
        sep=" ",
        sep2="</s>",
    ),
    "llava_v1": Conversation(
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        roles=("USER", "ASSISTANT"),
        version="v1",
        messages=(),
        offset=0,
        sep_style=SeparatorStyle.TWO,
        sep=" ",
        sep2="</s>",
    ),
    "llama_2": Conversation(  # LLaVA's `llava_llama_2`
        system="You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.",
        roles=("USER", "ASSISTANT"),
        version="llama_v2",
        messages=(),
        offset=0,
        sep_style=SeparatorStyle.LLAMA_2,
        sep="<s>",
        sep2="</s>",
    ),
    "plain": Conversation(
        system="", roles=("", ""), messages=(), offset=0, sep_style=SeparatorStyle.PLAIN, sep="\n"
    ),
}


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):  # noqa: N803
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])

    if return_tensors is not None:
        if return_tensors == "pt":
            return torch.tensor(input_ids, dtype=torch.long)
        raise ValueError(f"Unsupported tensor type: {return_tensors}")
    return input_ids


def preprocess_multimodal(sources):
    # data_args.is_multimodal = True, mm_use_im_start_end = False, version without "mmtag".
    for source in sources:
        for sentence in source:
            if DEFAULT_IMAGE_TOKEN in sentence["value"]:
                # DEVIATION: LLaVA-1.5 keeps one `<image>` per turn; we keep each one, `<image>\n` per
                # image in front, as our templates do (identical for one image).
                count = sentence["value"].count(DEFAULT_IMAGE_TOKEN)
                sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = (DEFAULT_IMAGE_TOKEN + "\n") * count + sentence["value"]
                sentence["value"] = sentence["value"].strip()
    return sources


def preprocess_llama_2(sources, tokenizer, conv_template, has_image=False):
    # DEVIATION: the conversation is an argument, not `conversation_lib.default_conversation`.
    conv = conv_template.copy()
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}

    # Apply prompt templates
    conversations = []
    for i, source in enumerate(sources):
        if roles[source[0]["from"]] != conv.roles[0]:
            # Skip the first one if it is not from human
            source = source[1:]

        conv.messages = []
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            assert role == conv.roles[j % 2], f"{i}"
            conv.append_message(role, sentence["value"])
        conversations.append(conv.get_prompt())

    # Tokenize conversations

    if has_image:
        input_ids = torch.stack(
            [tokenizer_image_token(prompt, tokenizer, return_tensors="pt") for prompt in conversations], dim=0
        )
    else:
        input_ids = tokenizer(
            conversations,
            return_tensors="pt",
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        ).input_ids

    targets = input_ids.clone()

    assert conv.sep_style == SeparatorStyle.LLAMA_2

    # Mask targets
    sep = "[/INST] "
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())

        rounds = conversation.split(conv.sep2)
        cur_len = 1
        target[:cur_len] = IGNORE_INDEX
        for i, rou in enumerate(rounds):  # noqa: B007 (verbatim)
            if rou == "":
                break

            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep

            if has_image:
                round_len = len(tokenizer_image_token(rou, tokenizer))
                instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
            else:
                round_len = len(tokenizer(rou).input_ids)
                instruction_len = len(tokenizer(parts[0]).input_ids) - 2

            target[cur_len : cur_len + instruction_len] = IGNORE_INDEX

            cur_len += round_len
        target[cur_len:] = IGNORE_INDEX

        if cur_len < tokenizer.model_max_length:
            if cur_len != total_len:
                target[:] = IGNORE_INDEX
                print(f"WARNING: tokenization mismatch: {cur_len} vs. {total_len}. (ignored)")

    return dict(input_ids=input_ids, labels=targets)


def preprocess_v1(sources, tokenizer, conv_template, has_image=False):
    # DEVIATION: the conversation is an argument, not `conversation_lib.default_conversation`.
    conv = conv_template.copy()
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}

    # Apply prompt templates
    conversations = []
    for i, source in enumerate(sources):
        if roles[source[0]["from"]] != conv.roles[0]:
            # Skip the first one if it is not from human
            source = source[1:]

        conv.messages = []
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            assert role == conv.roles[j % 2], f"{i}"
            conv.append_message(role, sentence["value"])
        conversations.append(conv.get_prompt())

    # Tokenize conversations

    if has_image:
        input_ids = torch.stack(
            [tokenizer_image_token(prompt, tokenizer, return_tensors="pt") for prompt in conversations], dim=0
        )
    else:
        input_ids = tokenizer(
            conversations,
            return_tensors="pt",
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        ).input_ids

    targets = input_ids.clone()

    assert conv.sep_style == SeparatorStyle.TWO

    # Mask targets
    sep = conv.sep + conv.roles[1] + ": "
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())

        rounds = conversation.split(conv.sep2)
        cur_len = 1
        target[:cur_len] = IGNORE_INDEX
        for i, rou in enumerate(rounds):
            if rou == "":
                break

            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep

            if has_image:
                round_len = len(tokenizer_image_token(rou, tokenizer))
                instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
            else:
                round_len = len(tokenizer(rou).input_ids)
                instruction_len = len(tokenizer(parts[0]).input_ids) - 2

            if i != 0 and not tokenizer.legacy and IS_TOKENIZER_GREATER_THAN_0_14:
                round_len -= 1
                instruction_len -= 1

            target[cur_len : cur_len + instruction_len] = IGNORE_INDEX

            cur_len += round_len
        target[cur_len:] = IGNORE_INDEX

        if cur_len < tokenizer.model_max_length:
            if cur_len != total_len:
                target[:] = IGNORE_INDEX
                print(f"WARNING: tokenization mismatch: {cur_len} vs. {total_len}. (ignored)")

    return dict(input_ids=input_ids, labels=targets)


def preprocess_plain(sources, tokenizer, conv_template):
    # add end signal and concatenate together
    conversations = []
    for source in sources:
        assert len(source) == 2
        assert DEFAULT_IMAGE_TOKEN in source[0]["value"]
        # DEVIATION: one `<image>` per image (LLaVA-1.5 has one image per sample).
        source[0]["value"] = DEFAULT_IMAGE_TOKEN * source[0]["value"].count(DEFAULT_IMAGE_TOKEN)
        conversation = source[0]["value"] + source[1]["value"] + conv_template.sep
        conversations.append(conversation)
    # tokenize conversations
    input_ids = [tokenizer_image_token(prompt, tokenizer, return_tensors="pt") for prompt in conversations]
    targets = copy.deepcopy(input_ids)
    for target, source in zip(targets, sources):
        tokenized_len = len(tokenizer_image_token(source[0]["value"], tokenizer))
        target[:tokenized_len] = IGNORE_INDEX

    return dict(input_ids=input_ids, labels=targets)


def llava_reference(template: str, conversations, tokenizer):
    """LLaVA's (input_ids, labels) for one sample, as `LazySupervisedDataset.__getitem__` builds them."""
    has_image = any(DEFAULT_IMAGE_TOKEN in t["value"] for t in conversations)
    sources = preprocess_multimodal(copy.deepcopy([conversations]))
    conv = CONV_TEMPLATES[template]
    if template == "plain":
        out = preprocess_plain(sources, tokenizer, conv)
    elif template == "llama_2":
        out = preprocess_llama_2(sources, tokenizer, conv, has_image=has_image)
    else:
        out = preprocess_v1(sources, tokenizer, conv, has_image=has_image)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert any(lab != IGNORE_INDEX for lab in labels), "LLaVA itself hit a tokenization mismatch"
    return ids, labels


def llava_in_our_terms(ids, labels, image_id: int, lone: int):
    """LLaVA's ids with each image expanded to N_IMG of our image ids, and the lone `▁` that directly
    follows an image (the dummy prefix of the chunk after it) removed with its label position."""
    out_ids, out_labels, prev = [], [], None
    for i, lab in zip(ids, labels):
        if i == lone and prev == IMAGE_TOKEN_INDEX:
            assert lab == IGNORE_INDEX
        elif i == IMAGE_TOKEN_INDEX:
            assert lab == IGNORE_INDEX
            out_ids += [image_id] * N_IMG
            out_labels += [IGNORE_INDEX] * N_IMG
        else:
            out_ids.append(i)
            out_labels.append(lab)
        prev = i
    return out_ids, out_labels


def conv_images(conv) -> int:
    return sum(t["value"].count("<image>") for t in conv)


def _show(tok, ids):
    return [tok.convert_ids_to_tokens(i) if i >= 0 else i for i in ids]


# ------------------------------------------------------------------------------------------ tests
LLAVA_CASES = [(t, s) for t in ["vicuna_v1", "llava_v1", "llama_2"] for s in CHAT_SAMPLES] + [
    ("plain", s) for s in PLAIN_SAMPLES
]


@pytest.mark.parametrize("name,sample", LLAVA_CASES)
def test_ids_and_labels_equal_llava_preprocess(llama2, llava_tokenizer, name, sample):
    conv = {**CHAT_SAMPLES, **PLAIN_SAMPLES}[sample]
    ref_ids, ref_labels = llava_reference(name, conv, llava_tokenizer)
    lone = llama2.convert_tokens_to_ids("▁")
    assert lone == 29871
    image_id = llama2.convert_tokens_to_ids("<image>")
    expected_ids, expected_labels = llava_in_our_terms(ref_ids, ref_labels, image_id, lone)
    n_images = conv_images(conv)
    # The only tokens set aside: one lone `▁` after each image in the chat templates, none in plain.
    removed = len(ref_ids) + n_images * (N_IMG - 1) - len(expected_ids)
    assert removed == (0 if name == "plain" else n_images)
    enc = get_template(name).encode(conv, llama2, num_image_tokens=N_IMG, num_images=n_images)
    assert _show(llama2, enc["input_ids"]) == _show(llama2, expected_ids)
    assert enc["labels"] == expected_labels


def _whole_string(tok, text: str) -> list[int]:
    """The tokenizer on the whole rendered string, each `<image>` expanded to N_IMG image ids."""
    image_id = tok.convert_tokens_to_ids("<image>")
    out = []
    for i in tok(text)["input_ids"]:
        out += [i] * N_IMG if i == image_id else [i]
    return out


ONE_TURN_SAMPLES = {
    "one_turn": MULTI_TURN[:1],
    "text_only_one_turn": TEXT_ONLY[:1],
    "image_only": [{"from": "human", "value": "<image>"}],
    **PLAIN_SAMPLES,
}
PROMPT_SAMPLES = {**CHAT_SAMPLES, **ONE_TURN_SAMPLES}
INFERENCE_CASES = [
    (tok, name, sample)
    for tok, names in [
        ("llama2", ["plain", "vicuna_v1", "llava_v1", "llama_2"]),
        ("tiny_llama", ["plain", "vicuna_v1", "llava_v1", "llama_2"]),
        # The vicuna/llama_2 strings render Llama's `</s>`, not ChatML's EOS: ChatML-family templates only.
        ("tiny_chatml", ["plain", "chatml", "auto"]),
    ]
    for name in names
    # `plain` is one human turn (its prompt: the images); given several turns it keeps the first
    # reply as a caption, tokenized as LLaVA's stage 1 does rather than as the whole string.
    for sample in (ONE_TURN_SAMPLES if name == "plain" else PROMPT_SAMPLES)
]


@pytest.mark.parametrize("tok_name,name,sample", INFERENCE_CASES)
def test_prompt_ids_equal_the_tokenizer_on_the_rendered_prompt(request, tok_name, name, sample):
    tok = request.getfixturevalue(tok_name)
    conv = PROMPT_SAMPLES[sample]
    template = get_template(name)
    if name == "auto":
        template.bind(tok)
    text = template.render(conv, add_generation_prompt=True)
    enc = template.encode(conv, tok, num_image_tokens=N_IMG, add_generation_prompt=True)
    assert _show(tok, enc["input_ids"]) == _show(tok, _whole_string(tok, text))


TRAINING_CASES = [
    (tok, name, sample)
    for tok, names in [
        ("llama2", ["vicuna_v1", "llava_v1", "llama_2"]),
        ("tiny_llama", ["vicuna_v1", "llava_v1", "llama_2"]),
        ("tiny_chatml", ["chatml", "auto"]),
    ]
    for name in names
    for sample in CHAT_SAMPLES
] + [
    # Byte-level BPE has no dummy prefix: plain's caption tokenizes alike as a start or a continuation.
    ("tiny_chatml", "plain", sample)
    for sample in PLAIN_SAMPLES
]


@pytest.mark.parametrize("tok_name,name,sample", TRAINING_CASES)
def test_training_ids_equal_the_tokenizer_on_the_rendered_conversation(request, tok_name, name, sample):
    tok = request.getfixturevalue(tok_name)
    conv = {**CHAT_SAMPLES, **PLAIN_SAMPLES}[sample]
    template = get_template(name)
    if name == "auto":
        template.bind(tok)
    enc = template.encode(conv, tok, num_image_tokens=N_IMG)
    assert _show(tok, enc["input_ids"]) == _show(tok, _whole_string(tok, template.render(conv)))


def test_first_text_token_keeps_its_word_start_marker(llama2):
    """The issue's two cases, spelled out: vicuna_v1's system prompt starts `▁A`, and in `plain` the
    caption (supervised) starts `▁a`, as in LLaVA."""
    enc = get_template("vicuna_v1").encode(MULTI_TURN, llama2, num_image_tokens=N_IMG)
    assert llama2.convert_ids_to_tokens(enc["input_ids"][:3]) == ["<s>", "▁A", "▁chat"]
    enc = get_template("plain").encode(PLAIN_ONE, llama2, num_image_tokens=N_IMG, num_images=1)
    ids, labels = enc["input_ids"], enc["labels"]
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert first == 1 + N_IMG
    assert llama2.convert_ids_to_tokens(ids[first : first + 3]) == ["▁a", "▁blue", "▁star"]
