"""The app (`create_app`: FastAPI, the OpenAI routes, the web page at `/`) and `python -m llava_lightning serve`.

Routes: `GET /v1/models`; `POST /v1/chat/completions` (`openai_api.py`), a `chat.completion` or, with
`"stream": true`, server-sent events (`data: {chunk}` each, `data: [DONE]` last). A refused request gets
OpenAI's error body with a 4xx status (`errors.py`). Listens on 127.0.0.1 unless `--host` says otherwise;
nothing authenticates requests, so expose it to a network only behind something that does.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..inference.chat import ReplyUsage, Sampling
from ..inference.load import add_model_arguments, load_from_arguments, model_id_of
from .engine import Engine, Limits
from .errors import ApiError
from .images import ImagePolicy, load_image
from .openai_api import chunk_body, completion_body, parse_chat_request

log = logging.getLogger(__name__)

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as err:  # pragma: no cover (the extra is missing)
    raise ImportError(
        "serving needs the serve extra: pip install 'llava-lightning[serve]' (fastapi, uvicorn, gradio)"
    ) from err


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends however it ends (a client that hung up included), so the
    generation behind it stops at once rather than when the garbage collector finds it."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def create_app(engine: Engine, images: ImagePolicy | None = None, web: bool = True) -> FastAPI:
    """The server for `engine`'s model; `web`: also the chat page at `/` (needs gradio)."""
    images = images or ImagePolicy()
    app = FastAPI(title="llava-lightning", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _refused(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": engine.model_id, "object": "model", "created": 0, "owned_by": "llava-lightning"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _read_json(request, engine.limits.max_body_bytes)
        ticket = engine.admit()
        try:
            chat = await anyio.to_thread.run_sync(
                lambda: _parse(body, engine, images)  # images decoded (maybe fetched) off the event loop
            )
            prompt = await anyio.to_thread.run_sync(
                engine.encode, chat.messages, chat.sampling.max_new_tokens
            )
        except BaseException:
            ticket.release()
            raise
        usage = ReplyUsage()
        pieces = engine.stream(prompt, chat.sampling, usage, ticket)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not chat.stream:
            parts: list[str] = []
            try:
                async for piece in pieces:
                    parts.append(piece)
                    if await request.is_disconnected():  # nobody to answer: stop generating
                        break
                text = "".join(parts)
            finally:
                await pieces.aclose()  # type: ignore[attr-defined]
            return completion_body(request_id, created, engine.model_id, text, usage)
        return _ClosingStreamingResponse(
            _events(pieces, request_id, created, engine.model_id, usage, chat.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    if web:
        try:
            from .web import mount_web
        except ImportError as err:
            raise ImportError(
                f"the web chat page needs gradio ({err}): pip install 'llava-lightning[serve]', or serve "
                "the API alone with --web false"
            ) from err

        app = mount_web(app, engine, images)
    return app


def _parse(body: Any, engine: Engine, images: ImagePolicy):
    return parse_chat_request(
        body,
        engine.model_id,
        engine.limits,
        engine.defaults,
        lambda url, param: load_image(url, images, param),
    )


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", "body_too_large"
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
    try:
        return json.loads(data)
    except ValueError as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", "invalid_json") from err


async def _events(
    pieces: AsyncIterator[str],
    request_id: str,
    created: int,
    model_id: str,
    usage: ReplyUsage,
    include_usage: bool,
) -> AsyncIterator[str]:
    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event(chunk_body(request_id, created, model_id, {"role": "assistant", "content": ""}))
        async for piece in pieces:
            yield event(chunk_body(request_id, created, model_id, {"content": piece}))
        yield event(chunk_body(request_id, created, model_id, {}, usage.finish_reason or "stop"))
        if include_usage:
            yield event(chunk_body(request_id, created, model_id, {}, usage=usage))
        yield "data: [DONE]\n\n"
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


def main(argv: list[str]) -> None:
    """`serve (--ckpt_path CKPT | --pretrained DIR | --preset NAME) [--host H] [--port P] ...`: the
    OpenAI-compatible server and the web chat page on one model."""
    from jsonargparse import ArgumentParser

    defaults, limits, policy = Sampling(), Limits(), ImagePolicy()
    parser = ArgumentParser(prog="python -m llava_lightning serve", description=main.__doc__)
    add_model_arguments(parser, "the server")
    parser.add_argument(
        "--model_name", default=None, help="Model id in /v1/models (default: from the source)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to listen on (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on")
    parser.add_argument("--web", type=bool, default=True, help="Serve the web chat page at / (needs gradio)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="Default temperature")
    parser.add_argument("--top_p", type=float, default=defaults.top_p, help="Default top_p")
    parser.add_argument(
        "--max_new_tokens", type=int, default=defaults.max_new_tokens, help="Default max_tokens"
    )
    parser.add_argument(
        "--max_tokens", type=int, default=limits.max_tokens, help="Most max_tokens a request may ask"
    )
    parser.add_argument(
        "--max_concurrent", type=int, default=limits.max_concurrent, help="Requests in flight (429 beyond)"
    )
    parser.add_argument(
        "--max_messages", type=int, default=limits.max_messages, help="Most messages per request"
    )
    parser.add_argument(
        "--max_text_chars", type=int, default=limits.max_text_chars, help="Most text per request"
    )
    parser.add_argument("--max_images", type=int, default=limits.max_images, help="Most images per request")
    parser.add_argument(
        "--max_image_bytes", type=int, default=policy.max_bytes, help="Most bytes of one image"
    )
    parser.add_argument(
        "--max_image_pixels", type=int, default=policy.max_pixels, help="Most pixels of one image"
    )
    parser.add_argument(
        "--allowed_image_dir", default=None, help="Serve local image paths under this folder only"
    )
    parser.add_argument("--allow_remote_images", type=bool, default=False, help="Fetch http(s) image URLs")
    args = parser.parse_args(argv)

    import uvicorn

    model, template, aspect = load_from_arguments(args)
    engine = Engine(
        model,
        template,
        aspect,
        args.model_name or model_id_of(args.ckpt_path, args.pretrained, args.preset),
        Limits(
            max_concurrent=args.max_concurrent,
            max_tokens=args.max_tokens,
            max_messages=args.max_messages,
            max_text_chars=args.max_text_chars,
            max_images=args.max_images,
            max_body_bytes=max(Limits().max_body_bytes, 2 * args.max_images * args.max_image_bytes),
        ),
        Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p),
    )
    images = ImagePolicy(
        allowed_dir=Path(args.allowed_image_dir) if args.allowed_image_dir else None,
        allow_remote=args.allow_remote_images,
        max_bytes=args.max_image_bytes,
        max_pixels=args.max_image_pixels,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: anyone who reaches it can use the model (there is no authentication)", args.host
        )
    app = create_app(engine, images, web=args.web)
    log.info(
        "serving %s on http://%s:%d (OpenAI API at /v1%s)",
        engine.model_id,
        args.host,
        args.port,
        ", web chat at /" if args.web else "",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
