"""The web chat page (Gradio, as LLaVA's own web UI): attach images, ask, watch the reply stream in.

Mounted at `/` on the API's app, it shares the engine: the same model, the same one-at-a-time generation and
the same cap on requests in flight, with the server's default sampling. Uploads go through the same image
limits as the API. The page loads nothing from the internet (system fonts, no analytics).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import anyio  # noqa: E402
import gradio as gr  # noqa: E402

from ..inference.chat import Message, ReplyUsage  # noqa: E402
from .engine import Engine  # noqa: E402
from .errors import ApiError  # noqa: E402
from .images import ImagePolicy, open_image  # noqa: E402


def _parts(content: Any) -> tuple[list[str], list[str]]:
    """A Gradio chat message's content -> (texts, file paths), whatever form this Gradio version gives it."""
    texts: list[str] = []
    files: list[str] = []
    items = content if isinstance(content, (list, tuple)) else [content]
    for item in items:
        if isinstance(item, str):
            # A bare tuple of paths is Gradio's old file message.
            (files if isinstance(content, tuple) else texts).append(item)
        elif isinstance(item, dict):
            if item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            elif "path" in item:
                files.append(item["path"])
            elif isinstance(item.get("file"), dict) and "path" in item["file"]:
                files.append(item["file"]["path"])
        elif getattr(item, "path", None):
            files.append(item.path)
    return texts, files


def _as_messages(history: list[dict], message: dict, images: ImagePolicy) -> list[Message]:
    # The new message's files are bare paths (strings), so they are wrapped to tell them from text.
    files = [f if isinstance(f, dict) else {"path": f} for f in message.get("files") or []]
    turns = [
        *history,
        {"role": "user", "content": [*files, {"type": "text", "text": message.get("text", "")}]},
    ]
    messages: list[Message] = []
    for turn in turns:
        role = "user" if turn.get("role") == "user" else "assistant"
        texts, files = _parts(turn.get("content"))
        pictures = (
            [open_image(Path(f).read_bytes(), images, "image") for f in files] if role == "user" else []
        )
        text = "\n".join(t for t in texts if t)
        if messages and messages[-1].role == role:  # Gradio keeps a file and its text as two messages
            last = messages[-1]
            last.text = "\n".join(t for t in (last.text, text) if t)
            last.images += pictures
        else:
            messages.append(Message(role, text, pictures))
    return messages


def build_page(engine: Engine, images: ImagePolicy) -> gr.ChatInterface:
    """The chat page for `engine`."""

    async def respond(message: dict, history: list[dict]):
        try:
            messages = await anyio.to_thread.run_sync(_as_messages, history, message, images)
            if len(messages) > engine.limits.max_messages:
                raise ApiError(
                    400, "the conversation is too long for this server; clear it", "too_many_messages"
                )
            if sum(len(m.images) for m in messages) > engine.limits.max_images:
                raise ApiError(
                    400, f"at most {engine.limits.max_images} images per conversation", "too_many_images"
                )
            if sum(len(m.text) for m in messages) > engine.limits.max_text_chars:
                raise ApiError(
                    400,
                    f"the conversation holds more than {engine.limits.max_text_chars} characters; clear it",
                    "too_much_text",
                )
            limit = engine.limits.max_tokens
            sampling = replace(engine.defaults, max_new_tokens=min(engine.defaults.max_new_tokens, limit))
            ticket = engine.admit()
        except ApiError as err:
            raise gr.Error(err.message) from err
        try:
            prompt = await anyio.to_thread.run_sync(engine.encode, messages, sampling.max_new_tokens)
        except ApiError as err:
            ticket.release()
            raise gr.Error(err.message) from err
        text = ""
        pieces = engine.stream(prompt, sampling, ReplyUsage(), ticket)
        try:
            async for piece in pieces:
                text += piece
                yield text
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]

    return gr.ChatInterface(
        respond,
        multimodal=True,
        title=f"llava-lightning: {engine.model_id}",
        description="Attach an image, ask about it; the reply streams in.",
        textbox=gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", placeholder="Ask about an image"
        ),
        analytics_enabled=False,
    )


def mount_web(app: Any, engine: Engine, images: ImagePolicy) -> Any:
    """`app` with the chat page at `/`."""
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return gr.mount_gradio_app(
        app, build_page(engine, images), path="/", max_file_size=images.max_bytes, theme=theme, ssr_mode=False
    )
