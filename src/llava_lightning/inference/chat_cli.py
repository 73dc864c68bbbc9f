"""`python -m llava_lightning chat`: talk to a model in the terminal (LLaVA's `llava.serve.cli`, with images
at any turn rather than only the first).

Each line read from stdin is a user turn, answered in the model's conversation template with the reply
streamed to stdout as it is generated (`inference/chat.py`). Lines starting with `/` are commands:
`/image PATH` attaches an image to the next turn (`--image PATH` does so for the first), `/reset` forgets
the conversation, `/help` lists them, `/exit` (or end of input, Ctrl-D) ends; `//text` sends `/text`.
An image that is missing or cannot be decoded is named with the reason on stderr, and the conversation
goes on without it. Ctrl-C stops a reply (the unanswered turn joins the next one); at the prompt it ends.

Prompts are shown only on a terminal, so piped input gives a transcript: one `ASSISTANT: ...` block per
turn on stdout, notes on stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from .chat import IMAGE, ChatSession, Message, Sampling, encode_messages
from .load import add_model_arguments, load_from_arguments

if TYPE_CHECKING:
    from PIL import Image

HELP = """commands:
  /image PATH   attach an image to your next message (several may be attached)
  /reset        forget the conversation (and images not sent yet)
  /exit         end (as does end of input, Ctrl-D)
  //text        send a message that starts with '/'"""

USER, ASSISTANT = "USER: ", "ASSISTANT: "


def load_image(session: ChatSession, path: str) -> Image.Image:
    """The image at `path` (`~` expanded), checked by encoding it as a prompt
    would be, so an image the model cannot take is refused now, not when the turn is sent.

    Raises `OSError` (missing, a folder, no permission) or `ImageDecodeError` (not an image, damaged, too
    large), each naming the file."""
    from ..data.image import decode_image

    image = decode_image(os.path.expanduser(path))
    encode_messages(session.model, [Message("user", "", [image])], session.template, session.aspect)
    return image


def _problem(path: str, err: Exception) -> str:
    if isinstance(err, OSError):  # the decoder's errors name the file; the OS's need it added
        return f"cannot read image {path}: {(err.strerror or str(err)).lower()}"
    return str(err)


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    write: Callable[[str], None],
    note: Callable[[str], None],
    sampling: Sampling | None = None,
    images: Iterable[str] = (),
) -> None:
    """The conversation loop: user `lines` in (commands included), each reply handed to `write` piece by
    piece as it is generated (after `ASSISTANT: `, then a newline); notes (bad images, command feedback)
    to `note`. `images` are paths attached to the first turn."""
    from ..data.image import ImageDecodeError

    pending: list[Image.Image] = []

    def attach(path: str) -> None:
        if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":  # a terminal quotes dragged files
            path = path[1:-1]
        if not path:
            note("/image needs a path: /image photo.jpg")
            return
        try:
            pending.append(load_image(session, path))
        except (OSError, ImageDecodeError) as err:
            note(f"{_problem(path, err)}; the conversation goes on without it")
            return
        note(f"image {path} attached to your next message ({len(pending)} waiting)")

    for path in images:
        attach(path)
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                pending.clear()
                note("conversation reset")
            elif command == "/image":
                attach(arg.strip())
            elif command == "/help":
                note(HELP)
            else:
                note(f"unknown command {command} (/help lists them; //text sends text starting with '/')")
            continue
        text = text[1:] if text.startswith("//") else text
        if IMAGE in text:  # the placeholder marks where image features go; typed text may not place one
            note(f"{IMAGE} in a message is reserved: attach images with /image PATH")
            continue
        session.ask(text, pending)
        pending = []
        write(ASSISTANT)
        reply = session.stream(sampling)
        try:
            for piece in reply:
                write(piece)
            write("\n")
        except KeyboardInterrupt:
            reply.close()  # stops the generation
            write("\n")
            note("[reply stopped; your message joins the next one]")


def _terminal_lines() -> Iterator[str]:
    """stdin's lines; on a terminal with a prompt and line editing, ending quietly on Ctrl-C / Ctrl-D."""
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            yield input(USER if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()  # noqa: T201 (leave the prompt's line)
            return


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # noqa: T201 (CLI output)


def main(argv: list[str] | None = None) -> None:
    """`chat (--ckpt_path CKPT | --pretrained DIR | --preset NAME) [--image PATH] [sampling flags]`: a
    multi-turn conversation with the model in the terminal; /help lists the commands."""
    from jsonargparse import ArgumentParser

    defaults = Sampling()
    parser = ArgumentParser(prog="python -m llava_lightning chat", description=main.__doc__)
    add_model_arguments(parser, "the chat")
    parser.add_argument(
        "--image",
        "--image_file",
        action="append",
        default=[],
        help="Image for the first message (repeatable; later ones: /image PATH)",
    )
    parser.add_argument("--system", default=None, help="System prompt replacing the template's")
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="0: greedy; else sampled"
    )
    parser.add_argument("--top_p", type=float, default=defaults.top_p, help="Nucleus sampling mass")
    parser.add_argument(
        "--max_new_tokens", type=int, default=defaults.max_new_tokens, help="Most tokens per reply"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seeds torch before the model is built (a --preset's random weights) and the sampling of the "
        "whole conversation, so a run repeats",
    )
    args = parser.parse_args(argv)

    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    # stdout is the transcript: what libraries print while loading (DeepSpeed's accelerator notice) goes
    # to stderr with the other notes.
    with contextlib.redirect_stdout(sys.stderr):
        model, template, aspect = load_from_arguments(args)
    # One generator for the conversation (torch's, seeded above): replies differ turn to turn, runs repeat.
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    session = ChatSession(model, template, aspect, system=args.system)
    _note(f"chat: template {template}, image aspect {aspect}; /help for commands, /exit or Ctrl-D to end")
    run_chat(session, _terminal_lines(), _write, _note, sampling, args.image)
