"""The server (`serve/`): the `openai` client against it on 127.0.0.1 gets `stream_reply`'s greedy replies
(non-streaming and streamed, with images as base64 data URLs); bad input and requests beyond the limits get
4xx errors in OpenAI's shape; local paths only under the allowed folder, remote URLs only when enabled; a
client that hangs up stops the generation; `python -m llava_lightning serve` starts from the command line."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import data_url, free_port, png_bytes, running  # noqa: E402

from llava_lightning import LlavaModel  # noqa: E402
from llava_lightning.inference.chat import Message, Sampling, encode_messages, stream_reply  # noqa: E402
from llava_lightning.serve.engine import Engine, Limits  # noqa: E402
from llava_lightning.serve.errors import ApiError  # noqa: E402
from llava_lightning.serve.images import ImagePolicy, load_image  # noqa: E402
from llava_lightning.serve.server import create_app  # noqa: E402

MAX_NEW = 12
LIMITS = Limits(max_concurrent=2, max_tokens=1000, max_messages=8, max_text_chars=20_000, max_images=2)


def _image(seed, w=96, h=80):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    model = LlavaModel.from_preset("tiny").eval()
    allowed = tmp_path_factory.mktemp("allowed")
    engine = Engine(
        model, "vicuna_v1", "pad", "tiny", LIMITS, Sampling(max_new_tokens=MAX_NEW, temperature=0.0)
    )
    policy = ImagePolicy(allowed_dir=allowed, max_bytes=100_000, max_pixels=300 * 300)
    with running(create_app(engine, policy, web=False)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        yield {"url": url, "client": client, "engine": engine, "model": model, "allowed": allowed}


def _greedy(model, messages, n=MAX_NEW):
    return "".join(
        stream_reply(model, messages, "vicuna_v1", "pad", Sampling(max_new_tokens=n, temperature=0.0))
    )


def _user(text, *images):
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_models_lists_the_served_model(served):
    assert [m.id for m in served["client"].models.list().data] == ["tiny"]


def test_non_streaming_reply_is_stream_replys_greedy_reply(served):
    image = _image(1)
    reply = served["client"].chat.completions.create(
        model="tiny", messages=[_user("What is it?", image)], max_tokens=MAX_NEW, temperature=0
    )
    messages = [Message("user", "What is it?", [image])]
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == _greedy(served["model"], messages)
    prompt = encode_messages(served["model"], messages, "vicuna_v1", "pad")
    assert reply.usage.prompt_tokens == prompt.input_ids.shape[1]
    assert 1 <= reply.usage.completion_tokens <= MAX_NEW
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == (
        "length" if reply.usage.completion_tokens == MAX_NEW else "stop"
    )


def test_streamed_reply_joins_to_the_greedy_reply(served):
    images = [_image(2), _image(3, 60, 120)]
    chunks = list(
        served["client"].chat.completions.create(
            model="tiny",
            messages=[
                {"role": "system", "content": "Be brief."},
                _user("Compare them.", *images),
                {"role": "assistant", "content": "They differ."},
                {"role": "user", "content": "How?"},
            ],
            max_tokens=MAX_NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    expected = _greedy(
        served["model"],
        [
            Message("system", "Be brief."),
            Message("user", "Compare them.", images),
            Message("assistant", "They differ."),
            Message("user", "How?"),
        ],
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and sum(1 for p in pieces if p) > 1  # streamed, in several pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_raw_sse_frames_end_with_done(served):
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 3}
    with httpx.stream("POST", served["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_a_local_path_under_the_allowed_folder_is_read(served):
    image = _image(4)
    path = served["allowed"] / "cat.png"
    path.write_bytes(png_bytes(image))
    for url in (str(path), path.as_uri()):
        reply = served["client"].chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What?"},
                    ],
                }
            ],
            temperature=0,
        )
        assert reply.choices[0].message.content == _greedy(
            served["model"], [Message("user", "What?", [image])]
        )


def _post(served, body, raw=None):
    content = raw if raw is not None else json.dumps(body).encode()
    response = httpx.post(
        served["url"] + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    return response.status_code, response.json()


def _image_message(url):
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ]
    }


def _refusals(served):
    outside = served["allowed"].parent / "outside.png"
    outside.write_bytes(png_bytes(_image(5)))
    link = served["allowed"] / "link.png"
    if not link.exists():
        link.symlink_to(outside)
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 255, (250, 250, 3), dtype=np.uint8))
    too_many_images = {"messages": [_user("?", _image(1), _image(2), _image(3))]}
    return {
        "remote url": (_image_message("http://127.0.0.1:9/cat.png"), 403, "remote_images_disabled"),
        "path outside the allowed folder": (_image_message(str(outside)), 403, "path_not_allowed"),
        "dot-dot out of the allowed folder": (
            _image_message(str(served["allowed"] / ".." / "outside.png")),
            403,
            "path_not_allowed",
        ),
        "symlink out of the allowed folder": (_image_message(str(link)), 403, "path_not_allowed"),
        "image over the byte limit": (_image_message(data_url(noise)), 413, "image_too_large"),
        "image over the pixel limit": (
            _image_message(data_url(Image.new("RGB", (400, 400)))),
            413,
            "image_too_large",
        ),
        "not base64": (_image_message("data:image/png;base64,@@@"), 400, "invalid_image_url"),
        "not an image": (_image_message("data:image/png;base64,aGVsbG8="), 400, "invalid_image"),
        "too many images": (too_many_images, 400, "too_many_images"),
        "max_tokens over the limit": (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1001},
            400,
            "invalid_value",
        ),
        "prompt + max_tokens over the context": (
            {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 1000},
            400,
            "context_length_exceeded",
        ),
        "messages not a list": ({"messages": "hi"}, 400, "invalid_value"),
        "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
        "last message not the user's": (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            400,
            "invalid_value",
        ),
        "image in an assistant message": (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": data_url(_image(1))}}],
                    },
                    {"role": "user", "content": "?"},
                ]
            },
            400,
            "invalid_value",
        ),
        "unknown content part": (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            400,
            "invalid_value",
        ),
        "too many messages": (
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 4
                + [{"role": "user", "content": "c"}]
            },
            400,
            "invalid_value",
        ),
        "unsupported field": (
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["x"]},
            400,
            "unsupported_parameter",
        ),
        "temperature out of range": (
            {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
            400,
            "invalid_value",
        ),
        "unknown model": (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model_not_found",
        ),
    }


def test_bad_requests_get_4xx_in_openais_error_shape(served):
    for name, (body, status, code) in _refusals(served).items():
        got, error = _post(served, body)
        assert (got, error["error"]["code"]) == (status, code), name
        assert error["error"]["message"] and error["error"]["type"], name
    status, error = _post(served, None, raw=b"{not json")
    assert (status, error["error"]["code"]) == (400, "invalid_json")
    assert served["engine"].in_flight == 0  # refusals free their place


def test_the_openai_client_raises_on_refusals(served):
    with pytest.raises(openai.PermissionDeniedError, match="remote image URLs are disabled"):
        served["client"].chat.completions.create(
            model="tiny", **_image_message("https://example.invalid/a.png")
        )
    with pytest.raises(openai.BadRequestError, match="at most 1000"):
        served["client"].chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5000
        )


def test_requests_beyond_max_concurrent_get_429(served):
    engine = served["engine"]
    tickets = [engine.admit() for _ in range(LIMITS.max_concurrent)]
    try:
        status, error = _post(served, {"messages": [{"role": "user", "content": "hi"}]})
        assert (status, error["error"]["code"], error["error"]["type"]) == (
            429,
            "too_many_requests",
            "rate_limit_error",
        )
    finally:
        for ticket in tickets:
            ticket.release()
    assert _post(served, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200


def test_concurrent_requests_take_turns_and_get_their_own_replies(served):
    texts = ["Name a colour.", "Name a shape."]
    results = {}

    def ask(text):
        results[text] = (
            served["client"]
            .chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": text}], temperature=0
            )
            .choices[0]
            .message.content
        )

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {t: _greedy(served["model"], [Message("user", t)]) for t in texts}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_stops_the_generation(served, monkeypatch, stream):
    model, engine = served["model"], served["engine"]
    calls = []
    forward = model.forward

    def slow_forward(*args, **kwargs):
        calls.append(1)
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    body = {
        "messages": [{"role": "user", "content": "Go on."}],
        "stream": stream,
        "max_tokens": 1000,
        "temperature": 1.0,
        "seed": 0,
    }
    if stream:
        with httpx.stream("POST", served["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(6):  # the role chunk and a few pieces
                next(lines)
    else:  # the client gives up waiting for the whole reply
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while (engine.generating or engine.in_flight) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.generating == 0 and engine.in_flight == 0
    stopped_at = len(calls)
    time.sleep(0.2)
    assert len(calls) == stopped_at < 500  # stopped, far short of max_tokens (10 s of forwards)


def test_remote_images_are_fetched_only_when_enabled(tmp_path):
    (tmp_path / "cat.png").write_bytes(png_bytes(_image(6)))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    try:
        with pytest.raises(ApiError, match="disabled") as refused:
            load_image(url, ImagePolicy())
        assert refused.value.status == 403
        got = load_image(url, ImagePolicy(allow_remote=True))
        assert np.array_equal(np.asarray(got), np.asarray(_image(6)))
        with pytest.raises(ApiError, match="exceeds") as big:
            load_image(url, ImagePolicy(allow_remote=True, max_bytes=1000))
        assert big.value.status == 413
    finally:
        httpd.shutdown()


def test_serve_command_starts_a_server_on_localhost():
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "llava_lightning",
        "serve",
        "--preset",
        "tiny",
        "--port",
        str(port),
        "--web",
        "false",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    assert json.load(r)["data"][0]["id"] == "tiny"
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_load_for_inference_wants_exactly_one_source():
    from llava_lightning.inference.load import load_for_inference

    for kwargs in ({}, {"preset": "tiny", "pretrained": "x"}):
        with pytest.raises(ValueError, match="exactly one model source"):
            load_for_inference(**kwargs)


def test_finish_reason_is_length_when_max_tokens_ends_the_reply(served):
    messages = [{"role": "user", "content": "Tell me more."}]
    reply = served["client"].chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, temperature=0
    )
    full = _greedy(served["model"], [Message("user", "Tell me more.")])
    assert len(full) > len(reply.choices[0].message.content)  # the greedy reply goes on past 2 tokens
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 2)
    assert full.startswith(reply.choices[0].message.content)


def test_load_for_inference_reads_a_folder_with_its_template_and_aspect(served, tmp_path):
    from llava_lightning.inference.load import load_for_inference

    served["model"].save_hf(tmp_path / "llava", template="llava_v1", image_aspect="square")
    model, template, aspect = load_for_inference(pretrained=str(tmp_path / "llava"))
    assert (template, aspect) == ("llava_v1", "square")
    image = _image(7)
    sampling = Sampling(max_new_tokens=MAX_NEW, temperature=0.0)
    messages = [Message("user", "What?", [image])]
    assert "".join(stream_reply(model, messages, template, aspect, sampling)) == "".join(
        stream_reply(served["model"], messages, template, aspect, sampling)
    )
