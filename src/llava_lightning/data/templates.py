"""Conversation templates and label masking that is correct by construction.

A template turns LLaVA JSON turns (`[{"from": "human", "value": ...}, {"from": "gpt", ...}]`) into
an ordered list of text segments, each either supervised (an assistant reply and its end-of-turn
marker) or not (system prompt, roles, questions, images). `encode` tokenizes segment by segment and
gives every token of a segment that segment's label, so labels cannot drift from the ids: there is
no re-tokenization of substrings and no length arithmetic (the cause of LLaVA's "tokenization
mismatch"). Exact strings follow LLaVA's `llava/conversation.py` (`conv_vicuna_v1`,
`conv_llava_plain`, ...).

Token ids. A segment is tokenized either as the start of a text (`tokenizer(text,
add_special_tokens=False)`: a SentencePiece tokenizer puts its `▁` dummy prefix on the first word) or
as a continuation (after an atomic special token, which is how a SentencePiece tokenizer with
`legacy=False` sees text in the middle of a string: no dummy prefix). The first non-empty segment of
a sequence is a start, the others are continuations, except `plain`'s caption (below). For a
byte-level BPE (no dummy prefix) both ways tokenize alike. What holds, checked in
`tests/test_llava_token_ids.py` with the Llama-2/Vicuna tokenizer (`legacy=False`):
- a chat template's ids equal the tokenizer on the rendered string (`render`, each `<image>` then
  expanded to `num_image_tokens` image ids), first token included (`▁A chat ...`), for training
  samples and for generation prompts alike (`generate` builds its prompts with this encoder);
- ids and labels equal LLaVA's `preprocess_plain` / `preprocess_v1` / `preprocess_llama_2` except
  for one token: LLaVA tokenizes the text after each `<image>` as a separate chunk
  (`tokenizer_image_token`), so after an image a text that starts with `\\n` gets a lone `▁` (id
  29871) in LLaVA, which the tokenizer on the whole string does not give and we do not either
  (unsupervised, inside the prompt);
- `plain` (stage 1) tokenizes the caption after the image as the start of a text, as LLaVA does: the
  supervised caption starts `▁a`, not `a` (a fresh chunk in LLaVA; the generation prompt of `plain`
  is the images alone, so inference is unaffected).
Generation prompts use the same encoder, so a prompt is token for token the training prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..batch import IGNORE_INDEX

IMAGE = "<image>"
# Placeholders resolved against the tokenizer at encode time (rendered as Llama's strings otherwise).
EOS, BOS = "\x00eos\x00", "\x00bos\x00"
_DEFAULT_SPECIALS = {EOS: "</s>", BOS: "<s>"}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."


class SampleError(ValueError):
    """A sample that cannot be encoded; `reason` is the counter key a data stream skips it under."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool
    start: bool = False
    """Tokenize as the start of a text (dummy prefix) even when text precedes it (`plain`'s caption)."""


def _normalize_images(value: str) -> str:
    """LLaVA puts a turn's images first: `<image>\\n` per image, then the text."""
    count = value.count(IMAGE)
    if not count:
        return value
    return (IMAGE + "\n") * count + value.replace(IMAGE, "").strip()


def _turns(conversations: list[dict[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system override, [(question, answer-or-None), ...]) after checking human/gpt alternation."""
    if not conversations:
        raise SampleError("empty_conversation", "the sample has no turns")
    system = None
    turns = list(conversations)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError(
                "malformed_record",
                f"turn {i} is a {type(turn).__name__}, not an object with 'from' and 'value'",
            )
    if turns[0].get("from") == "system":
        system = str(turns.pop(0).get("value", ""))
    pairs: list[tuple[str, str | None]] = []
    for i, turn in enumerate(turns):
        role = turn.get("from")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise SampleError(
                "bad_turn_order", f"turn {i} is from {role!r}, expected {expected!r} (human/gpt alternation)"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise SampleError("malformed_record", f"turn {i} has no string 'value'")
        if expected == "human":
            pairs.append((value, None))
        else:
            pairs[-1] = (pairs[-1][0], value)
    return system, pairs


class Template:
    """Base class: subclasses build the segment list; `render` and `encode` are shared."""

    name: str = ""

    def segments(
        self, conversations: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> list[Segment]:
        """The conversation as ordered segments; with `add_generation_prompt` the last human turn is
        left open for the assistant's reply (a trailing gpt turn, if any, is dropped)."""
        system, pairs = _turns(conversations)
        if add_generation_prompt and pairs and pairs[-1][1] is not None:
            pairs[-1] = (pairs[-1][0], None)
        if not add_generation_prompt and (not pairs or pairs[-1][1] is None):
            raise SampleError("no_assistant_reply", "the conversation does not end with a gpt turn")
        return self._build(system, [(_normalize_images(q), a) for q, a in pairs])

    def _build(self, system: str | None, pairs: list[tuple[str, str | None]]) -> list[Segment]:
        raise NotImplementedError

    def render(self, conversations: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as one string (Llama's `<s>`/`</s>` for the BOS/EOS placeholders)."""
        text = "".join(s.text for s in self.segments(conversations, add_generation_prompt))
        for placeholder, value in _DEFAULT_SPECIALS.items():
            text = text.replace(placeholder, value)
        return text

    def encode(
        self,
        conversations: list[dict[str, Any]],
        tokenizer: Any,
        num_image_tokens: int | Sequence[int],
        max_length: int | None = None,
        num_images: int | None = None,
        add_generation_prompt: bool = False,
    ) -> dict[str, list[int]]:
        """`input_ids` and `labels` (-100 outside assistant replies); each `<image>` becomes
        `num_image_tokens` image-token ids (a sequence: the i-th `<image>` its i-th entry, anyres images
        each having their own count). Raises `SampleError` for a sample that must be skipped."""
        segments = self.segments(conversations, add_generation_prompt)
        image_count = sum(s.text.count(IMAGE) for s in segments)
        if num_images is not None and image_count != num_images:
            raise SampleError(
                "image_count_mismatch",
                f"the text has {image_count} <image> but the sample has {num_images} images",
            )
        if isinstance(num_image_tokens, int):
            counts: Iterator[int] = itertools.repeat(num_image_tokens)
        else:
            if len(num_image_tokens) != image_count:
                raise SampleError(
                    "image_count_mismatch",
                    f"the text has {image_count} <image> but {len(num_image_tokens)} image-token counts were given",
                )
            counts = iter(num_image_tokens)
        codec = _SegmentCodec.of(tokenizer)
        ids: list[int] = list(codec.bos)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        started = False  # has any text been tokenized? The first text is a start, as in the whole string.
        for seg in segments:
            piece = codec.tokenize(seg.text, counts, start=seg.start or not started)
            started = started or bool(seg.text)
            ids += piece
            labels += piece if seg.supervised else [IGNORE_INDEX] * len(piece)
        if max_length is not None and len(ids) > max_length:
            if codec.image_id in ids[max_length:]:
                raise SampleError(
                    "image_truncated",
                    f"max_length {max_length} cuts an image span ({len(ids)} tokens in all)",
                )
            ids, labels = ids[:max_length], labels[:max_length]
        if not add_generation_prompt and all(lab == IGNORE_INDEX for lab in labels):
            raise SampleError(
                "no_supervised_tokens",
                f"no assistant token left within max_length {max_length} ({len(ids)} tokens kept)",
            )
        return {"input_ids": ids, "labels": labels}


class _SegmentCodec:
    """Tokenizes segments (as a start or a continuation), resolves BOS/EOS placeholders, expands `<image>`."""

    _cache: dict[int, _SegmentCodec] = {}

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        if self.image_id is None or self.image_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {IMAGE} token: build it with llava_lightning's language model"
            )
        alone = tokenizer(IMAGE, add_special_tokens=False)["input_ids"]
        if alone != [self.image_id]:
            raise RuntimeError(f"tokenizer does not keep {IMAGE!r} as one token: {alone}")
        probe = tokenizer("x")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe[:1] == [bos] else []
        self.specials = {EOS: tokenizer.eos_token or "", BOS: tokenizer.bos_token or ""}

    @classmethod
    def of(cls, tokenizer: Any) -> _SegmentCodec:
        codec = cls._cache.get(id(tokenizer))
        if codec is None or codec.tokenizer is not tokenizer:
            codec = cls._cache[id(tokenizer)] = cls(tokenizer)
        return codec

    def tokenize(self, text: str, num_image_tokens: int | Iterator[int], start: bool = False) -> list[int]:
        """`text`'s ids as the start of a text (`start`: the tokenizer's dummy prefix, if any, applies)
        or as a continuation of one; each `<image>` becomes `num_image_tokens` image ids (an iterator:
        its next value, image after image)."""
        if isinstance(num_image_tokens, int):
            num_image_tokens = itertools.repeat(num_image_tokens)
        for placeholder, value in self.specials.items():
            text = text.replace(placeholder, value)
        if start:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            # The atomic `<image>` token in front makes the text a continuation (no dummy prefix).
            ids = self.tokenizer(IMAGE + text, add_special_tokens=False)["input_ids"]
            if ids[:1] != [self.image_id]:
                raise RuntimeError(f"tokenizer split {IMAGE!r} into several tokens: {ids[:4]}")
            ids = ids[1:]
        out: list[int] = []
        for i in ids:
            if i == self.image_id:
                out += [i] * next(num_image_tokens)
            else:
                out.append(i)
        return out


class PlainTemplate(Template):
    """Stage 1: the human turn is replaced by its images; text = images + caption + newline.

    The caption is tokenized as the start of a text (`▁a blue ...`), as LLaVA's `preprocess_plain`
    does (`tokenizer_image_token` tokenizes the text after the image as a chunk of its own)."""

    name = "plain"

    def _build(self, system, pairs):
        question, answer = pairs[0]
        images = IMAGE * question.count(IMAGE)
        segs = [Segment(images, False)]
        if answer is not None:
            segs.append(Segment(answer + "\n", True, start=True))
        return segs


class VicunaTemplate(Template):
    """`{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>` (LLaVA sep_style TWO)."""

    def __init__(self, name: str, system: str):
        self.name, self.system = name, system

    def _build(self, system, pairs):
        segs, prompt = [], (self.system if system is None else system) + " "
        for question, answer in pairs:
            prompt += f"USER: {question} ASSISTANT:"
            segs.append(Segment(prompt, False))
            prompt = ""
            if answer is not None:
                segs.append(Segment(f" {answer}{EOS}", True))
        return segs


class Llama2Template(Template):
    """`[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...` (LLaVA sep_style LLAMA_2)."""

    name = "llama_2"

    def _build(self, system, pairs):
        system = LLAMA_2_SYSTEM if system is None else system
        segs = []
        for i, (question, answer) in enumerate(pairs):
            if i == 0 and system:
                question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
            segs.append(Segment(("" if i == 0 else BOS) + f"[INST] {question} [/INST]", False))
            if answer is not None:
                segs.append(Segment(f" {answer} {EOS}", True))
        return segs


class HeaderTemplate(Template):
    """Role-header formats: ChatML (`<|im_start|>role\\n...<|im_end|>\\n`) and Llama-3."""

    def __init__(self, name: str, system: str, start: str, end: str, sep: str, lead: str = ""):
        self.name, self.system, self.start, self.end, self.sep, self.lead = (
            name,
            system,
            start,
            end,
            sep,
            lead,
        )

    def _header(self, role: str) -> str:
        return self.start.format(role=role)

    def _build(self, system, pairs):
        system = self.system if system is None else system
        prompt = self.lead + (self._header("system") + system + self.end + self.sep if system else "")
        segs = []
        for question, answer in pairs:
            prompt += self._header("user") + question + self.end + self.sep + self._header("assistant")
            segs.append(Segment(prompt, False))
            prompt = self.sep
            if answer is not None:
                segs.append(Segment(answer + self.end, True))
        return segs

    def segments(self, conversations, add_generation_prompt=False):
        segs = super().segments(conversations, add_generation_prompt)
        if not add_generation_prompt:
            segs.append(Segment(self.sep, False))
        return segs


class AutoTemplate(Template):
    """The tokenizer's own chat template (`apply_chat_template`), split into segments turn by turn.

    Requires an incremental template: the text for turns[:k] with a generation prompt must be a
    prefix of the text for turns[:k+1]. The assistant segment is supervised up to and including
    the tokenizer's EOS string when the template writes one there.
    """

    name = "auto"

    def __init__(self):
        self._tokenizer = None

    def bind(self, tokenizer: Any) -> AutoTemplate:
        self._tokenizer = tokenizer
        return self

    def _build(self, system, pairs):
        tok = self._tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("template 'auto' needs a tokenizer with a chat_template (call encode with it)")
        messages = [{"role": "system", "content": system}] if system is not None else []
        segs, done = [], ""
        for question, answer in pairs:
            messages.append({"role": "user", "content": question})
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if not prompt.startswith(done):
                raise ValueError("the tokenizer's chat template is not incremental; pick a named template")
            segs.append(Segment(prompt[len(done) :], False))
            done = prompt
            if answer is None:
                break
            messages.append({"role": "assistant", "content": answer})
            full = tok.apply_chat_template(messages, tokenize=False)
            if not full.startswith(done):
                raise ValueError("the tokenizer's chat template is not incremental; pick a named template")
            reply = full[len(done) :]
            eos = tok.eos_token or ""
            cut = reply.rfind(eos) + len(eos) if eos and eos in reply else len(reply)
            segs.append(Segment(reply[:cut], True))
            if reply[cut:]:
                segs.append(Segment(reply[cut:], False))
            done = full
        return segs

    def encode(self, conversations, tokenizer, *args, **kwargs):
        self.bind(tokenizer)
        return super().encode(conversations, tokenizer, *args, **kwargs)


TEMPLATES = {
    "plain": PlainTemplate,
    "vicuna_v1": lambda: VicunaTemplate("vicuna_v1", VICUNA_SYSTEM),
    "llava_v1": lambda: VicunaTemplate("llava_v1", LLAVA_V1_SYSTEM),
    "llama_2": Llama2Template,
    "chatml": lambda: HeaderTemplate("chatml", CHATML_SYSTEM, "<|im_start|>{role}\n", "<|im_end|>", "\n"),
    "llama3": lambda: HeaderTemplate(
        "llama3",
        LLAMA_2_SYSTEM,
        "<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        "",
    ),
    "auto": AutoTemplate,
}


def get_template(name: str) -> Template:
    """The template called `name`: plain, vicuna_v1, llava_v1, llama_2, chatml, llama3 or auto."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]()
