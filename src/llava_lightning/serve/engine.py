"""The model behind the server: one generation at a time on its device, a cap on requests in flight.

A request is admitted (`admit`: a `Ticket`) or refused with 429 when `max_concurrent` are already in flight;
admitted ones wait their turn for the model (an asyncio lock) and stream from `inference.chat.stream_prompt`,
whose blocking reads run in worker threads. A reader that stops (a client that hangs up, a page closed) closes
the stream, which stops the generation and frees the model for the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ..inference.chat import EncodedPrompt, Message, ReplyUsage, Sampling, encode_messages, stream_prompt
from .errors import ApiError

if TYPE_CHECKING:
    from ..model.llava import LlavaModel


@dataclass
class Limits:
    """What one request may ask for (beyond these: a 4xx error naming the limit)."""

    max_concurrent: int = 4
    """Requests in flight at once (one generates, the others wait for the model); more get 429."""
    max_tokens: int = 1024
    """Most new tokens a request may ask for (`max_tokens`); more get 400."""
    max_messages: int = 64
    """Most messages in one request."""
    max_text_chars: int = 32_000
    """Most characters of text over all messages of one request."""
    max_images: int = 4
    """Most images in one request (over all its messages)."""
    max_body_bytes: int = 64 * 2**20
    """Most bytes of one request body (images arrive inside it, base64)."""


class Ticket:
    """A request's place among those in flight; `release` (idempotent) frees it."""

    def __init__(self, engine: Engine):
        self._engine, self._held = engine, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engine.in_flight -= 1


class Engine:
    """A model, its conversation template and image aspect, the server's limits and sampling defaults."""

    def __init__(
        self,
        model: LlavaModel,
        template: str,
        aspect: str,
        model_id: str,
        limits: Limits | None = None,
        defaults: Sampling | None = None,
    ):
        self.model, self.template, self.aspect, self.model_id = model, template, aspect, model_id
        self.limits = limits or Limits()
        self.defaults = defaults or Sampling()
        self.in_flight = 0  # admitted requests not finished (waiting or generating)
        self.generating = 0  # streams holding the model (0 or 1)
        self._lock: asyncio.Lock | None = None

    @property
    def context_length(self) -> int | None:
        """The language model's position limit (prompt + reply), when its config says."""
        config = getattr(self.model.language_model, "config", None)
        return getattr(config, "max_position_embeddings", None)

    def admit(self) -> Ticket:
        """A ticket for one more request, or 429 when `max_concurrent` are in flight."""
        if self.in_flight >= self.limits.max_concurrent:
            raise ApiError(
                429,
                f"the server is busy ({self.in_flight} requests in flight, the limit is "
                f"{self.limits.max_concurrent}); retry later",
                "too_many_requests",
            )
        self.in_flight += 1
        return Ticket(self)

    def encode(self, messages: Sequence[Message], max_new_tokens: int) -> EncodedPrompt:
        """The prompt for `messages`, or 400 when they do not make one or it leaves no room for the reply."""
        try:
            prompt = encode_messages(self.model, messages, self.template, self.aspect)
        except ValueError as err:
            raise ApiError(
                400, f"cannot build a prompt from these messages: {err}", "invalid_messages", "messages"
            ) from err
        limit, length = self.context_length, int(prompt.input_ids.shape[1])
        if limit is not None and length + max_new_tokens > limit:
            raise ApiError(
                400,
                f"the prompt has {length} tokens (images included) and max_tokens is {max_new_tokens}: more than "
                f"the model's context of {limit} tokens; shorten the conversation or lower max_tokens",
                "context_length_exceeded",
                "messages",
            )
        return prompt

    async def stream(
        self, prompt: EncodedPrompt, sampling: Sampling, usage: ReplyUsage, ticket: Ticket
    ) -> AsyncIterator[str]:
        """The reply's pieces once the model is free; releases `ticket` when done or closed."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with self._lock:
                self.generating += 1
                pieces = stream_prompt(self.model, prompt, sampling, usage)
                try:
                    while True:
                        piece = await anyio.to_thread.run_sync(next, pieces, None)
                        if piece is None:
                            break
                        yield piece
                finally:
                    # Closing joins the generation thread: the model is free once this returns.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(pieces.close)
                    self.generating -= 1
        finally:
            ticket.release()
