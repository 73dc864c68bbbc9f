"""OpenAI's chat-completions shapes: a request body -> messages and sampling (refusing what the server cannot
do with a 4xx naming the field), and a reply -> `chat.completion` / `chat.completion.chunk` bodies.

Supported: `model`, `messages` (roles `system` / `developer` first, `user`, `assistant`; `content` a string or
a list of `text` and `image_url` parts, images in user messages only), `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `seed`, `n` = 1, `stream`, `stream_options.include_usage`.
Other fields OpenAI defines (`stop`, `tools`, `logprobs`, ...) are refused when set, never ignored silently.
Consecutive messages of one role are joined (text by a newline), as the template needs turns to alternate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from ..inference.chat import Message, ReplyUsage, Sampling
from .engine import Limits
from .errors import ApiError

KNOWN_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
"""Fields that change nothing here: accepted and ignored."""
NOT_SUPPORTED = {
    "stop",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
}
"""OpenAI fields this server does not implement: refused when set to anything but their default."""


@dataclass
class ChatRequest:
    """A checked `/v1/chat/completions` request."""

    messages: list[Message]
    """The conversation, consecutive turns of one role joined."""
    sampling: Sampling
    """How to draw the reply."""
    stream: bool
    """Reply as server-sent events."""
    include_usage: bool
    """Streaming: end with a chunk carrying `usage`."""


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


def parse_chat_request(
    body: Any,
    model_id: str,
    limits: Limits,
    defaults: Sampling,
    load_image: Callable[[str, str], Image.Image],
) -> ChatRequest:
    """Check `body` field by field; `load_image(url, param)` fetches an `image_url` part's image."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_request")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(
            404,
            f"model {model!r} does not exist here; this server serves {model_id!r}",
            "model_not_found",
            "model",
        )
    for key in NOT_SUPPORTED:
        value = body.get(key)
        if value not in (None, [], {}, False) and not (
            key in ("presence_penalty", "frequency_penalty") and value == 0
        ):
            raise _bad(f"{key} is not supported by this server", key, "unsupported_parameter")
    if body.get("n", 1) not in (1, None):
        raise _bad("n must be 1 (one reply per request)", "n", "unsupported_parameter")

    sampling = replace(defaults)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _bad("max_tokens must be a positive integer", "max_tokens")
        if max_tokens > limits.max_tokens:
            raise _bad(
                f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens"
            )
        sampling.max_new_tokens = max_tokens
    else:
        sampling.max_new_tokens = min(sampling.max_new_tokens, limits.max_tokens)
    temperature = body.get("temperature")
    if temperature is not None:
        if not _number(temperature) or not 0 <= temperature <= 2:
            raise _bad("temperature must be a number from 0 to 2", "temperature")
        sampling.temperature = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _number(top_p) or not 0 < top_p <= 1:
            raise _bad("top_p must be a number in (0, 1]", "top_p")
        sampling.top_p = float(top_p)
    seed = body.get("seed")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise _bad("seed must be an integer", "seed")
        sampling.seed = seed
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    return ChatRequest(
        parse_messages(body.get("messages"), limits, load_image),
        sampling,
        stream,
        bool(options.get("include_usage", False)),
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_messages(raw: Any, limits: Limits, load_image: Callable[[str, str], Image.Image]) -> list[Message]:
    """OpenAI messages -> `Message`s (images loaded), within the limits."""
    if not isinstance(raw, list) or not raw:
        raise _bad("messages must be a non-empty list", "messages")
    if len(raw) > limits.max_messages:
        raise _bad(f"{len(raw)} messages; this server allows at most {limits.max_messages}", "messages")
    messages: list[Message] = []
    chars = images = 0
    for i, item in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{param} must be an object with role and content", param)
        role = item.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(
                f"{param}.role must be system, developer, user or assistant (got {role!r})", f"{param}.role"
            )
        content = item.get("content")
        texts: list[str] = []
        pictures: list[Image.Image] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                where = f"{param}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    if role != "user":
                        raise _bad(f"{where}: only user messages may carry images", where)
                    images += 1
                    if images > limits.max_images:
                        raise _bad(
                            f"more than {limits.max_images} images in one request", where, "too_many_images"
                        )
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    pictures.append(load_image(url, where))
                else:
                    raise _bad(
                        f"{where} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': "
                        "{'url': 'data:image/png;base64,...'}}",
                        where,
                    )
        elif content is None and role == "assistant":
            pass
        else:
            raise _bad(f"{param}.content must be a string or a list of content parts", f"{param}.content")
        text = "\n".join(texts)
        chars += len(text)
        if chars > limits.max_text_chars:
            raise _bad(f"the messages hold more than {limits.max_text_chars} characters of text", "messages")
        if role == "system" and messages:
            raise _bad(f"{param}: a system message may only come first", param)
        if messages and messages[-1].role == role:
            last = messages[-1]
            last.text, last.images = last.text + "\n" + text, last.images + pictures
        else:
            messages.append(Message(role, text, pictures))
    if messages[-1].role != "user":
        raise _bad("the last message must be the user's", "messages")
    return messages


def completion_body(request_id: str, created: int, model_id: str, text: str, usage: ReplyUsage) -> dict:
    """A non-streaming reply (`chat.completion`)."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": usage.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_body(usage),
    }


def usage_body(usage: ReplyUsage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def chunk_body(
    request_id: str,
    created: int,
    model_id: str,
    delta: dict,
    finish_reason: str | None = None,
    usage: ReplyUsage | None = None,
) -> dict:
    """One server-sent event of a streamed reply (`chat.completion.chunk`); with `usage`, the final
    usage-only chunk (no choices)."""
    body: dict = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_id}
    if usage is not None:
        body["choices"], body["usage"] = [], usage_body(usage)
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return body
