"""Terminal chat (`inference/chat_cli.py`): the command's transcript equals `stream_reply`'s greedy replies
for the same conversation (history kept, an image at turn 2, `/reset` forgets), replies reach the output
piece by piece while they are generated, a bad image is named and the conversation goes on, Ctrl-C stops
a reply, and a training checkpoint or an exported folder chats with its own weights and template."""

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from llava_lightning import LlavaModel
from llava_lightning.data.image import decode_image
from llava_lightning.inference.chat import ChatSession, Message, Sampling, stream_reply
from llava_lightning.inference.chat_cli import main, run_chat

GREEDY = Sampling(max_new_tokens=8, temperature=0.0)
FLAGS = ["--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "shape.png"
    Image.fromarray(np.random.RandomState(3).randint(0, 255, (90, 140, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlavaModel.from_preset("tiny").eval()


def _replies(model, conversations, template="vicuna_v1"):
    return ["".join(stream_reply(model, messages, template, "pad", GREEDY)) for messages in conversations]


def test_the_command_answers_a_piped_conversation_as_stream_reply_does(image_path, tmp_path):
    """`chat --preset tiny --seed 0`, turns piped in: one `ASSISTANT:` block per turn, each the greedy reply
    to the conversation so far (the image at turn 2; the missing one named on stderr and left out; after
    `/reset`, a fresh conversation)."""
    missing = tmp_path / "missing.jpg"
    stdin = f"Name a colour.\n/image {image_path}\n/image {missing}\nWhat shape is this?\n/reset\nHi again.\n"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "llava_lightning", "chat", "--preset", "tiny", "--seed", "0", *FLAGS]
    done = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]

    torch.manual_seed(0)  # the command seeds torch before building the preset: the same weights
    model = LlavaModel.from_preset("tiny").eval()
    image = decode_image(image_path)
    first = [Message("user", "Name a colour.")]
    (r1,) = _replies(model, [first])
    second = [*first, Message("assistant", r1), Message("user", "What shape is this?", [image])]
    r2, r3 = _replies(model, [second, [Message("user", "Hi again.")]])
    assert done.stdout == f"ASSISTANT: {r1}\nASSISTANT: {r2}\nASSISTANT: {r3}\n"
    assert f"cannot read image {missing}: no such file or directory; the conversation goes on" in done.stderr
    assert "conversation reset" in done.stderr


def test_the_session_holds_each_turn_its_image_and_forgets_on_reset(tiny, image_path, tmp_path):
    """What the transcript above cannot show with a random model (its greedy replies barely depend on the
    prompt): the history the loop keeps, turn by turn."""
    session = ChatSession(tiny, "vicuna_v1", "pad")
    missing = tmp_path / "missing.jpg"
    lines = ["Name a colour.", f"/image {image_path}", f"/image {missing}", "What shape is this?"]
    run_chat(session, lines, lambda _: None, lambda _: None, GREEDY)
    image = decode_image(image_path)
    r1, r2 = session.messages[1].text, session.messages[3].text
    assert session.messages == [
        Message("user", "Name a colour."),
        Message("assistant", r1),
        Message("user", "What shape is this?", [image]),
        Message("assistant", r2),
    ]
    run_chat(session, ["/reset", "Hi again."], lambda _: None, lambda _: None, GREEDY)
    assert session.messages[0] == Message("user", "Hi again.")
    assert [m.role for m in session.messages] == ["user", "assistant"]


def test_replies_reach_the_output_piece_by_piece_while_generating(tiny, image_path, monkeypatch):
    """The third forward pass waits until a piece of the reply has been written: the output gets text while
    the reply is still being generated, in several calls, and the pieces join to `stream_reply`'s reply."""
    expected = _replies(tiny, [[Message("user", "What is this?", [decode_image(image_path)])]])[0]
    written: list[str] = []
    notes: list[str] = []
    first_piece = threading.Event()
    waited: list[bool] = []
    forward, calls = tiny.forward, []

    def gated_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            waited.append(first_piece.wait(timeout=60))
        return forward(*args, **kwargs)

    def write(text):
        written.append(text)
        if text != "ASSISTANT: ":
            first_piece.set()

    monkeypatch.setattr(tiny, "forward", gated_forward)
    session = ChatSession(tiny, "vicuna_v1", "pad")
    run_chat(session, ["What is this?"], write, notes.append, GREEDY, images=[str(image_path)])
    assert notes == [f"image {image_path} attached to your next message (1 waiting)"]
    assert waited == [True]
    assert written[0] == "ASSISTANT: " and written[-1] == "\n"
    pieces = written[1:-1]
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert session.messages[-1] == Message("assistant", expected)


def test_bad_images_and_commands_are_named_and_the_conversation_goes_on(tiny, image_path, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image_path.read_bytes()[:80])
    lines = [
        f"/image {tmp_path / 'missing.png'}",
        f"/image {not_image}",
        f"/image {truncated}",
        f"/image {tmp_path}",
        "/image",
        "A <image> here",
        "/frobnicate",
        f"/image '{image_path}'",  # quoted, as a terminal pastes a dragged file
        "//slash text",
        "/exit",
        "never read",
    ]
    notes: list[str] = []
    session = ChatSession(tiny, "vicuna_v1", "pad")
    run_chat(session, lines, lambda _: None, notes.append, Sampling(max_new_tokens=2, temperature=0.0))
    assert notes[:7] == [
        f"cannot read image {tmp_path / 'missing.png'}: no such file or directory; the conversation goes on "
        "without it",
        f"image '{not_image}' is not in a format Pillow recognises (or is damaged); the conversation goes on "
        "without it",
        notes[2],
        f"cannot read image {tmp_path}: is a directory; the conversation goes on without it",
        "/image needs a path: /image photo.jpg",
        "<image> in a message is reserved: attach images with /image PATH",
        "unknown command /frobnicate (/help lists them; //text sends text starting with '/')",
    ]
    assert f"image '{truncated}' is truncated or corrupt" in notes[2]
    assert notes[7] == f"image {image_path} attached to your next message (1 waiting)"
    # One turn was sent, with the one good image; /exit ended before the last line.
    (user,) = [m for m in session.messages if m.role == "user"]
    assert user.text == "/slash text" and len(user.images) == 1
    assert np.array_equal(np.asarray(user.images[0]), np.asarray(Image.open(image_path)))
    assert [m.role for m in session.messages] == ["user", "assistant"]


def test_seeded_sampling_repeats_and_the_seed_matters(monkeypatch, capsys):
    def chat(seed):
        monkeypatch.setattr(sys, "stdin", io.StringIO("Tell me a story.\nAnd then?\n"))
        main(["--preset", "tiny", "--seed", str(seed), "--temperature", "1.0", "--max_new_tokens", "12"])
        return capsys.readouterr().out

    first = chat(1)
    assert first.count("ASSISTANT: ") == 2
    assert chat(1) == first and chat(2) != first


def test_chat_from_an_exported_folder_uses_its_template(tiny, image_path, tmp_path, monkeypatch, capsys):
    """`--pretrained DIR` on a folder `save_hf` wrote with template llava_v1: the chat speaks llava_v1 with
    the folder's weights (the replies of the model that was saved)."""
    out = tmp_path / "export"
    tiny.save_hf(out, template="llava_v1", image_aspect="pad")
    capsys.readouterr()  # what saving printed (DeepSpeed's accelerator notice, on stdout)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\n"))
    main(["--pretrained", str(out), "--image", str(image_path), *FLAGS])
    captured = capsys.readouterr()
    assert "template llava_v1, image aspect pad" in captured.err
    expected = _replies(tiny, [[Message("user", "What is this?", [decode_image(image_path)])]], "llava_v1")[0]
    assert captured.out == f"ASSISTANT: {expected}\n"
    # Not merely vicuna_v1's reply: the system prompts differ, and so do the replies here.
    assert expected != _replies(tiny, [[Message("user", "What is this?", [decode_image(image_path)])]])[0]


def test_chat_from_a_training_checkpoint(tiny_stage2_ckpt, image_path, monkeypatch, capsys):
    """`--ckpt_path` (the issue's form): the run's weights, template and image aspect."""
    from llava_lightning.module import LlavaLitModule

    monkeypatch.setattr(sys, "stdin", io.StringIO("What shape is this?\nAnd its colour?\n"))
    main(["--ckpt_path", str(tiny_stage2_ckpt), "--image", str(image_path), *FLAGS])
    captured = capsys.readouterr()
    assert "template vicuna_v1, image aspect pad" in captured.err
    lit = LlavaLitModule.load_from_checkpoint(tiny_stage2_ckpt, map_location="cpu", weights_only=True)
    model = lit.model.eval()
    first = [Message("user", "What shape is this?", [decode_image(image_path)])]
    (r1,) = _replies(model, [first])
    (r2,) = _replies(model, [[*first, Message("assistant", r1), Message("user", "And its colour?")]])
    assert captured.out == f"ASSISTANT: {r1}\nASSISTANT: {r2}\n"


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tiny, monkeypatch):
    """Ctrl-C while a reply streams (here: raised by the output) stops the generation; the unanswered
    message joins the next one."""
    forward, calls = tiny.forward, []
    monkeypatch.setattr(tiny, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    written, notes = [], []

    def write(text):
        written.append(text)
        if len(written) == 3:  # "ASSISTANT: ", a piece, then the interrupt
            raise KeyboardInterrupt

    long = Sampling(max_new_tokens=300, temperature=1.0, seed=0)
    session = ChatSession(tiny, "vicuna_v1", "pad")
    run_chat(session, ["Tell me a story."], write, notes.append, long)
    assert notes == ["[reply stopped; your message joins the next one]"] and written[-1] == "\n"
    assert len(calls) < 50  # stopped, not run to 300 tokens
    assert session.messages == [Message("user", "Tell me a story.")]
    run_chat(session, ["Shorter, please."], lambda _: None, notes.append, GREEDY)
    assert session.messages[0] == Message("user", "Tell me a story.\nShorter, please.")
    assert [m.role for m in session.messages] == ["user", "assistant"]
