"""The web chat page (`serve/web.py`) in a real headless browser: Playwright drives the OS's Chromium (never a
downloaded one) against the server on 127.0.0.1; an uploaded image and a question get the model's greedy
reply (the same text `stream_reply` gives), seen growing in the page piece by piece; the next turn carries
the history; an image over the server's limit shows the limit's message. Skipped without Chromium (`.ci/run`
installs Debian's `chromium`) or without Playwright."""

import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from serve_helpers import png_bytes, running  # noqa: E402

from llava_lightning import LlavaModel  # noqa: E402
from llava_lightning.inference.chat import Message, Sampling, stream_reply  # noqa: E402
from llava_lightning.serve.engine import Engine, Limits  # noqa: E402
from llava_lightning.serve.images import ImagePolicy  # noqa: E402
from llava_lightning.serve.server import create_app  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    # pandas deprecations inside gradio's queue, not ours
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

MAX_NEW = 12
STEP_S = 0.08  # each forward slowed by this much, so the page shows the reply as it grows
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Records every text the last bot message shows (a MutationObserver, so no state between polls is missed).
RECORD_BOT_TEXTS = """() => {
  window.botTexts = [];
  const record = () => {
    const bots = document.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText;
    if (window.botTexts[window.botTexts.length - 1] !== text) window.botTexts.push(text);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def _image(seed, w=96, h=80):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _greedy(model, messages):
    sampling = Sampling(max_new_tokens=MAX_NEW, temperature=0.0)
    return "".join(stream_reply(model, messages, "vicuna_v1", "pad", sampling))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no system Chromium (`chromium` / `chromium-browser` on PATH); .ci/run installs Debian's")
    torch.manual_seed(0)
    model = LlavaModel.from_preset("tiny").eval()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_S)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    engine = Engine(
        model, "vicuna_v1", "pad", "tiny", Limits(), Sampling(max_new_tokens=MAX_NEW, temperature=0.0)
    )
    policy = ImagePolicy(max_bytes=200_000, max_pixels=200 * 200)
    with (
        running(create_app(engine, policy, web=True)) as url,
        sync_api.sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url + "/", timeout=60_000)
            page.locator("textarea").first.wait_for(timeout=60_000)
            yield {"page": page, "model": model, "engine": engine, "dir": tmp_path_factory.mktemp("up")}
            assert outside == []  # the page loads nothing from the internet
        finally:
            browser.close()


def _send(page, text, image_path=None):
    box = page.locator("textarea").first
    # The textbox is disabled until the previous reply's event has ended; an upload before then is dropped.
    sync_api.expect(box).to_be_editable(timeout=30_000)
    if image_path is not None:
        page.locator('input[type="file"]').first.set_input_files(str(image_path))
        # Sent only once the upload shows as a thumbnail in the textbox.
        page.locator('[aria-label="Uploaded files"] img').first.wait_for(timeout=30_000)
    box.fill(text)
    box.press("Enter")


def _wait_reply(page, n_bots, expected):
    """The `n_bots`-th reply once it reads `expected` (a clear failure with what it showed if it never does)."""
    bot = page.locator('[data-testid="bot"]').nth(n_bots - 1)
    try:
        page.wait_for_function(
            """([n, expected]) => {
                 const bots = document.querySelectorAll('[data-testid="bot"]');
                 return bots.length >= n && bots[n - 1].innerText.trim() === expected.trim();
               }""",
            arg=[n_bots, expected],
            timeout=60_000,
        )
    except sync_api.TimeoutError:
        shown = bot.inner_text() if bot.count() else None
        pytest.fail(f"reply {n_bots} never read {expected!r}; the page shows {shown!r}")
    return bot.inner_text()


def test_upload_ask_and_see_the_reply_stream_in(page):
    p, model = page["page"], page["model"]
    image = _image(1)
    path = page["dir"] / "noise.png"
    path.write_bytes(png_bytes(image))
    p.evaluate(RECORD_BOT_TEXTS)
    _send(p, "What is it?", path)
    expected = _greedy(model, [Message("user", "What is it?", [image])])
    assert expected.strip()
    _wait_reply(p, 1, expected)
    seen = [t for t in p.evaluate("window.botTexts") if t.strip()]
    growing = [t for t in seen if t.strip() != expected.strip()]
    # Streamed: the page showed partial replies, each a beginning of the whole one, before the end.
    assert len(growing) >= 2, seen
    assert all(expected.startswith(t.strip()) for t in growing), seen

    # The next turn answers the whole conversation (image, first reply, new question).
    p.evaluate(RECORD_BOT_TEXTS)
    _send(p, "And now?")
    expected2 = _greedy(
        model,
        [
            Message("user", "What is it?", [image]),
            Message("assistant", expected),
            Message("user", "And now?"),
        ],
    )
    assert expected2 != expected  # the history changed the prompt
    _wait_reply(p, 2, expected2)
    _wait_idle(page["engine"])


def _wait_idle(engine):
    deadline = time.monotonic() + 30
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0 and engine.generating == 0


def test_an_image_over_the_limit_shows_the_limit(page):
    p = page["page"]
    path = page["dir"] / "big.png"
    path.write_bytes(png_bytes(Image.new("RGB", (300, 300))))  # 90,000 pixels > 40,000, few bytes
    _send(p, "What is it?", path)
    p.get_by_text("exceeds the limit of 40000 pixels").first.wait_for(timeout=30_000)
    _wait_idle(page["engine"])
