"""Tokenizers built offline in well under a second, for the `tiny` presets, tests and the demo.

Two families, trained with `tokenizers` on an embedded English corpus (chat-template strings and
the vocabulary of the synthetic-shapes data):
- `tiny:llama`: SentencePiece-style like Llama-2/Vicuna: `▁` word boundaries, BPE with byte
  fallback (`<0x00>`..`<0xFF>`), `<unk>`=0, `<s>`=1 (added in front), `</s>`=2.
- `tiny:chatml`: byte-level BPE like Qwen2: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, no BOS,
  a ChatML chat template.
Neither is a real model's tokenizer; they stand in where no download is possible.
"""

from __future__ import annotations

import functools
import json

_WORDS = """
a an the and or of in on at to is are was were be it this that these those there here what which who
how many much where when why yes no not with without for from by as image picture photo shows show
describe look looking see seen left right top bottom middle center centre upper lower corner side
above below next beside near far between one two three four five six seven eight nine ten zero
red green blue yellow orange purple pink brown black white gray grey cyan magenta colour color
colours colors circle circles square squares triangle triangles star stars shape shapes object objects
large small big tiny count number answer option options letter choices choice given directly
question context following best correct A B C D E first second third only both each all some none
background foreground contains containing drawn drawing placed located appears appear has have
user assistant system human gpt chat between curious artificial intelligence gives helpful detailed
polite answers questions you are able understand visual content provides assist variety tasks
using natural language vision INST SYS USER ASSISTANT caption captions text plain same more fewer
than nothing opposite sides points grid cells round equal mixing sky clear day grass get do does
""".split()

_SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    "Answer with the option's letter from the given choices directly.",
    "What colour is the shape? What shape is in the image? How many shapes are there?",
    "Where is the red circle? It is in the top left corner. There are two shapes.",
    "USER: <image>\nWhat is shown? ASSISTANT: A blue square.</s>",
    "[INST] <<SYS>>\n\n<</SYS>>\n\n [/INST]",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
]


def _corpus() -> list[str]:
    lines = list(_SENTENCES)
    words = _WORDS + [w.capitalize() for w in _WORDS]
    for i in range(0, len(words), 7):
        lines.append(" ".join(words[i : i + 7]) + ".")
    lines += [f"{n} {n + 1} {n * 3}" for n in range(100)]
    # Words that start a line (after a newline they carry no `▁`, as in Llama).
    starters = "What Which How Where Is Are Describe Context Answer Question A B C D E The There".split()
    lines += ["".join("\n" + w for w in starters[i : i + 4]) for i in range(0, len(starters), 4)]
    lines.append("! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~ \n \t")
    return lines * 3


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train_llama(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # A newline is a piece of its own and the word after it gets no `▁`, as in Llama ("\nB. red" ->
    # "\n", "B", ".", "▁red"); without the split, BPE merges newlines into the next word.
    metaspace = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    tok.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Rebuild with the 256 byte-fallback pieces after the specials, as Llama's vocabulary has them.
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in trained:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    out = Tokenizer(model)
    out.add_special_tokens(specials)
    out.pre_tokenizer = metaspace
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return out


def _train_chatml(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


@functools.lru_cache(maxsize=4)
def _trained(family: str, vocab_size: int) -> str:
    tok = _train_llama(vocab_size) if family == "llama" else _train_chatml(vocab_size)
    return tok.to_str()


def build_tiny_tokenizer(family: str = "llama", vocab_size: int = 2000):
    """A `PreTrainedTokenizerFast` of the given family (`llama` or `chatml`), built offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if family not in ("llama", "chatml"):
        raise ValueError(f"unknown tiny tokenizer family {family!r}: use 'llama' or 'chatml'")
    tok = Tokenizer.from_str(_trained(family, vocab_size))
    if family == "llama":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )
