"""Multi-turn chat with a `LlavaModel`: messages (images attached to any user turn) in the model's
conversation template, the reply streamed as text pieces. The terminal chat and the server use it.

A conversation is encoded as training encodes one (`Template.encode` with a generation prompt), each
image as a `<image>\\n` line in front of its turn's text (LLaVA's layout), so a prompt is token for token
what the model was trained on. Generation runs in a worker thread (`generate_ids` with `on_token`);
`stream_reply` yields the new text after each token, holding back an incomplete character, and stops
the worker when its consumer stops reading (a closed connection, Ctrl-C).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..data.anyres_image import AnyresTransform
from ..data.image import ImageTransform
from ..data.templates import get_template
from ..model.generation import generate_ids
from .generate import eos_ids_for

if TYPE_CHECKING:
    from PIL import Image

    from ..model.llava import LlavaModel

IMAGE = "<image>"


@dataclass
class Message:
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]
    """Who speaks; a system message may only come first."""
    text: str
    """What is said (for `system`, the system prompt replacing the template's)."""
    images: list[Image.Image] = field(default_factory=list)
    """Images attached to a user turn, in order."""


@dataclass
class Sampling:
    """How the reply is drawn (LLaVA's CLI defaults: temperature 0.2, 512 new tokens)."""

    max_new_tokens: int = 512
    """Most tokens in the reply."""
    temperature: float = 0.2
    """0: greedy; else sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens holding this much probability."""
    seed: int | None = None
    """Seed of the sampler (None: torch's global generator)."""


@dataclass
class EncodedPrompt:
    """A conversation ready for `generate_ids`."""

    input_ids: torch.Tensor
    """`[1, T]` prompt ids (image runs expanded)."""
    pixel_values: torch.Tensor | None
    """The images' tower inputs in order (uint8), or None."""
    image_sizes: torch.Tensor | None
    """Anyres models: `[N, 2]` (height, width) of each image."""
    eos_ids: list[int]
    """Ids that end the reply (the tokenizer's EOS and the template's end-of-turn token)."""


def encode_messages(
    model: LlavaModel, messages: Sequence[Message], template: str = "vicuna_v1", aspect: str = "pad"
) -> EncodedPrompt:
    """The prompt for the assistant's next reply: `messages` alternate user / assistant (an optional system
    message first) and end with a user turn."""
    conversation: list[dict[str, str]] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        if message.role == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            conversation.append({"from": "system", "value": message.text})
            continue
        if message.images and message.role != "user":
            raise ValueError("only user turns carry images")
        value = (IMAGE + "\n") * len(message.images) + message.text
        conversation.append({"from": "human" if message.role == "user" else "gpt", "value": value})
        images += message.images
    if not conversation or conversation[-1]["from"] != "human":
        raise ValueError("the conversation must end with a user turn")
    tmpl = get_template(template)
    tower, anyres = model.vision_tower, getattr(model, "anyres", None)
    sizes: list[tuple[int, int]] = []
    if anyres is not None:
        transform: Any = AnyresTransform(anyres, tower.image_mean, tower.image_std)
        sizes = [transform.image_size(img) for img in images]
        counts: Any = [anyres.num_tokens(h, w) for h, w in sizes]
    else:
        transform = ImageTransform.from_tower(tower, aspect)
        counts = tower.num_tokens
    enc = tmpl.encode(
        conversation, model.tokenizer, counts, num_images=len(images), add_generation_prompt=True
    )
    pixels = [transform(img) for img in images]
    pixel_values = None
    if pixels:
        pixel_values = torch.cat(pixels) if anyres is not None else torch.stack(pixels)
    return EncodedPrompt(
        input_ids=torch.tensor([enc["input_ids"]], dtype=torch.long),
        pixel_values=pixel_values,
        image_sizes=torch.tensor(sizes, dtype=torch.long) if sizes else None,
        eos_ids=eos_ids_for(model.tokenizer, tmpl),
    )


@dataclass
class ReplyUsage:
    """What a reply cost and why it ended (filled in by `stream_prompt` as it runs)."""

    prompt_tokens: int = 0
    """Tokens of the prompt (image runs expanded)."""
    completion_tokens: int = 0
    """Tokens generated (the end-of-turn token included when one ended the reply)."""
    finish_reason: Literal["stop", "length"] | None = None
    """`stop`: an end-of-turn token (or the reader stopped); `length`: `max_new_tokens` reached."""


def stream_reply(
    model: LlavaModel,
    messages: Sequence[Message],
    template: str = "vicuna_v1",
    aspect: str = "pad",
    sampling: Sampling | None = None,
) -> Iterator[str]:
    """The assistant's reply to `messages`, as text pieces while it is generated (joined: the whole reply,
    without its end-of-turn token). Stopping the iteration early stops the generation."""
    yield from stream_prompt(model, encode_messages(model, messages, template, aspect), sampling)


def stream_prompt(
    model: LlavaModel,
    prompt: EncodedPrompt,
    sampling: Sampling | None = None,
    usage: ReplyUsage | None = None,
) -> Iterator[str]:
    """`stream_reply` for a prompt already encoded (the server checks its length first); `usage`, when
    given, is kept up to date."""
    sampling = sampling or Sampling()
    usage = usage if usage is not None else ReplyUsage()
    usage.prompt_tokens = int(prompt.input_ids.shape[1])
    tokens: queue.Queue = queue.Queue()
    stop = threading.Event()
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(sampling.seed)

    def on_token(token: torch.Tensor) -> bool:
        tokens.put(int(token[0]))
        return stop.is_set()

    def work() -> None:
        try:
            generate_ids(
                model,
                prompt.input_ids,
                pixel_values=prompt.pixel_values,
                image_sizes=prompt.image_sizes,
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                eos_token_ids=prompt.eos_ids,
                generator=generator,
                on_token=on_token,
            )
            tokens.put(None)
        except BaseException as err:  # noqa: BLE001 (handed to the reading thread, which raises it)
            tokens.put(err)

    worker = threading.Thread(target=work, name="llava-generate", daemon=True)
    worker.start()
    decoder = _IncrementalDecoder(model.tokenizer, set(prompt.eos_ids))
    try:
        while True:
            item = tokens.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            usage.completion_tokens += 1
            piece = decoder.add(item)
            if decoder.ended:
                break
            if piece:
                yield piece
        usage.finish_reason = (
            "stop" if decoder.ended or usage.completion_tokens < sampling.max_new_tokens else "length"
        )
        tail = decoder.flush()
        if tail:
            yield tail
    finally:
        if usage.finish_reason is None:
            usage.finish_reason = "stop"
        stop.set()
        worker.join()


class _IncrementalDecoder:
    """Token ids -> the new text each adds (a character split over several tokens waits for the rest)."""

    def __init__(self, tokenizer: Any, end_ids: set[int]):
        self.tokenizer, self.end_ids = tokenizer, end_ids
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if token in self.end_ids:
            self.ended = True
            return ""
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self._text())

    def _advance(self, text: str) -> str:
        # Stripped as `generate` strips a reply: leading spaces (the template's separator) never go out,
        # trailing ones only once more text follows them.
        text = text.strip()
        if not text.startswith(self.sent):  # decoding changed text already sent (rare): send what is new
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class ChatSession:
    """A conversation with memory: `ask` adds a user turn, `stream` yields the reply and keeps it."""

    def __init__(
        self, model: LlavaModel, template: str = "vicuna_v1", aspect: str = "pad", system: str | None = None
    ):
        self.model, self.template, self.aspect = model, template, aspect
        self.messages: list[Message] = [Message("system", system)] if system is not None else []

    def ask(self, text: str, images: Sequence[Image.Image] = ()) -> None:
        """Add a user turn (with its images); a user turn left unanswered is merged into this one."""
        if self.messages and self.messages[-1].role == "user":
            last = self.messages.pop()
            text, images = last.text + "\n" + text, [*last.images, *images]
        self.messages.append(Message("user", text, list(images)))

    def stream(self, sampling: Sampling | None = None) -> Iterator[str]:
        """The reply to the conversation so far, in pieces; once read to the end it joins the history."""
        pieces: list[str] = []
        for piece in stream_reply(self.model, self.messages, self.template, self.aspect, sampling):
            pieces.append(piece)
            yield piece
        self.messages.append(Message("assistant", "".join(pieces)))

    def reset(self) -> None:
        """Forget every turn but the system message."""
        self.messages = [m for m in self.messages if m.role == "system"]
