"""Our conversation templates as Jinja chat templates (transformers' `apply_chat_template`, vLLM), written
into exported folders so serving engines build the prompts the model was trained on.

Messages are llava-hf's: `{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}`
(or a plain string). A user turn renders as our encoder builds it (`templates._normalize_images`): one
`<image>\\n` per image first, then the text parts joined (stripped when the turn has images). A leading
system message replaces the template's system prompt. With `add_generation_prompt=True` the rendering
is exactly `Template.render(..., add_generation_prompt=True)`.

No BOS in the template: transformers' processor adds it when tokenizing (a text after an explicit `<s>`
loses its SentencePiece dummy prefix, so `<s>` written by the template would change the first token).
EOS / BOS inside the conversation (vicuna's `</s>` after a reply, llama_2's `<s>` between turns) are
the tokenizer's strings, baked in at export.
"""

from __future__ import annotations

import json

from .templates import (
    BOS,
    EOS,
    HeaderTemplate,
    Llama2Template,
    PlainTemplate,
    VicunaTemplate,
    get_template,
)

# The text of `message` (a string, or the text parts of a content list) into `ns.text`, its image count
# into `ns.images`. Written out at each use: vLLM detects the content format from loops over
# `message['content']`.
_READ = (
    "{%- set ns.text = '' -%}{%- set ns.images = 0 -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'text' -%}{%- set ns.text = ns.text + content['text'] -%}"
    "{%- elif content['type'] in ['image', 'image_url'] -%}{%- set ns.images = ns.images + 1 -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
)
# A user turn's text as our encoder lays it out: images first, each on its own line.
_QUESTION = "('<image>\\n' * ns.images + (ns.text | trim if ns.images else ns.text))"


def _lit(text: str) -> str:
    """`text` as a Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


def _out(text: str) -> str:
    return "{{- " + _lit(text) + " -}}" if text else ""


def _system_prelude(default: str) -> str:
    """`ns.system`: the leading system message's text, else `default`."""
    return (
        "{%- set ns = namespace(text='', images=0, system=" + _lit(default) + ", turn=0) -%}"
        "{%- for message in messages -%}{%- if loop.first and message['role'] == 'system' -%}"
        + _READ
        + "{%- set ns.system = ns.text -%}{%- endif -%}{%- endfor -%}"
    )


def _loop(user: str, assistant: str, generation: str) -> str:
    """Each user / assistant message rendered by `user` / `assistant` (after `_READ`), then the
    generation prompt; `ns.turn` counts the user turns before the current one."""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}" + _READ + user + "{%- set ns.turn = ns.turn + 1 -%}"
        "{%- elif message['role'] == 'assistant' -%}" + _READ + assistant + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + _out(generation) + "{%- endif -%}"
    )


def jinja_chat_template(name: str, bos_token: str | None, eos_token: str | None) -> str | None:
    """The Jinja chat template of our template `name`, with the tokenizer's BOS / EOS strings; None for
    `auto` (the tokenizer's own template already is the conversation format)."""
    template = get_template(name)
    bos, eos = bos_token or "", eos_token or ""

    def specials(text: str) -> str:
        return text.replace(EOS, eos).replace(BOS, bos)

    if isinstance(template, PlainTemplate):
        # Stage 1: the first user turn's images, then the first reply and a newline; nothing else.
        return "{%- set ns = namespace(text='', images=0, turn=0, replied=false) -%}" + _loop(
            "{%- if ns.turn == 0 -%}{{- '<image>' * ns.images -}}{%- endif -%}",
            "{%- if ns.turn == 1 and not ns.replied -%}{{- ns.text + '\\n' -}}"
            "{%- set ns.replied = true -%}{%- endif -%}",
            "",
        )
    if isinstance(template, VicunaTemplate):
        return (
            _system_prelude(template.system)
            + "{{- ns.system + ' ' -}}"
            + _loop(
                "{{- 'USER: ' + " + _QUESTION + " + ' ' -}}",
                "{{- 'ASSISTANT: ' + ns.text + " + _lit(specials(EOS)) + " -}}",
                "ASSISTANT:",
            )
        )
    if isinstance(template, Llama2Template):
        from .templates import LLAMA_2_SYSTEM

        first = (
            "{%- if ns.system -%}{{- '[INST] <<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' + "
            + _QUESTION
            + " + ' [/INST]' -}}{%- else -%}{{- '[INST] ' + "
            + _QUESTION
            + " + ' [/INST]' -}}{%- endif -%}"
        )
        later = "{{- " + _lit(specials(BOS) + "[INST] ") + " + " + _QUESTION + " + ' [/INST]' -}}"
        return _system_prelude(LLAMA_2_SYSTEM) + _loop(
            "{%- if ns.turn == 0 -%}" + first + "{%- else -%}" + later + "{%- endif -%}",
            "{{- ' ' + ns.text + ' ' + " + _lit(specials(EOS)) + " -}}",
            "",
        )
    if isinstance(template, HeaderTemplate):
        header = template._header
        return (
            _system_prelude(template.system)
            + _out(template.lead)
            + "{%- if ns.system -%}{{- "
            + _lit(header("system"))
            + " + ns.system + "
            + _lit(template.end + template.sep)
            + " -}}{%- endif -%}"
            + _loop(
                "{{- "
                + _lit(header("user"))
                + " + "
                + _QUESTION
                + " + "
                + _lit(template.end + template.sep)
                + " -}}",
                "{{- "
                + _lit(header("assistant"))
                + " + ns.text + "
                + _lit(template.end + template.sep)
                + " -}}",
                header("assistant"),
            )
        )
    return None
