"""What the benchmark converters share: LLaVA-1.5's answer-format prompts, reading a release's files with
errors that name them, counting and naming the records that cannot be converted, keeping image paths
inside the image root, and writing the question file."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger("data_recipes.benchmarks")

# LLaVA-1.5's response-format prompts (paper, Table 8; the question files of LLaVA's eval.zip).
SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
MAX_NAMED = 5  # bad records named in the log per converter run


def letter(index: int) -> str:
    return chr(ord("A") + index)


def with_options(question: str, options: Iterable[str]) -> str:
    """`question\\nA. x\\nB. y\\n...` (LLaVA's multiple-choice layout, without the suffix)."""
    return question + "".join(f"\n{letter(i)}. {o}" for i, o in enumerate(options))


class Skips:
    """Release records that could not be converted: counted by reason, the first few named (file and
    record) in a warning. A converter never drops a record without passing it through here."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.named: list[str] = []

    def add(self, where: str, reason: str) -> None:
        self.counts[reason.split(":")[0]] += 1
        if len(self.named) < MAX_NAMED:
            self.named.append(f"{where}: {reason}")
            log.warning("skipped %s: %s", where, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items())) or "none"


def each(
    records: Iterable[Any], where: str, skips: Skips, build: Callable[[Any], dict[str, Any] | None]
) -> Iterator[dict[str, Any]]:
    """`build(record)` for each record; a record that lacks a field or holds a bad value (KeyError,
    TypeError, ValueError) is skipped and counted under `where: record N`. `build` may return None for
    a record that is not a question of this benchmark (not counted: SEED-Bench's video questions)."""
    for n, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise TypeError(f"bad record: a {type(record).__name__}, not an object")
            question = build(record)
        except KeyError as e:
            skips.add(f"{where}: record {n}", f"missing field: {e.args[0]!r}")
            continue
        except (TypeError, ValueError) as e:
            message = str(e)
            skips.add(
                f"{where}: record {n}",
                message if message.startswith("bad record:") else f"bad record: {message}",
            )
            continue
        if question is not None:
            yield question


def relative_image(name: Any) -> str:
    """An image path from a release's annotations, checked to stay under the image root: a relative
    POSIX path without `..` (else ValueError: the record is skipped)."""
    if not isinstance(name, str | int) or isinstance(name, bool) or str(name) == "":
        raise ValueError(f"image name {name!r} is not a path")
    path = PurePosixPath(str(name))
    if path.is_absolute() or ".." in path.parts or "\\" in str(name):
        raise ValueError(f"image path {str(name)!r} leaves the image root")
    return str(path)


def read_json(path: str | Path, what: str) -> Any:
    """A release's JSON file, or an error naming it and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None


def read_json_lines(path: str | Path, what: str, skips: Skips) -> list[Any]:
    """A JSON-lines release file; a line that is not JSON is skipped and counted (named by line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                skips.add(f"{path}:{n}", f"bad record: not a JSON line ({e.msg})")
    return out


def write_questions(questions: Iterable[dict[str, Any]], out: str | Path) -> int:
    """Write LLaVA's question JSON lines (`question_id`, `image`, `text`, ...); returns the count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
            n += 1
    log.info("wrote %d questions to %s", n, out)
    return n


def check_images(questions: list[dict[str, Any]], image_root: str | Path | None) -> dict[str, int]:
    """Count the questions whose image `evaluate --image_root image_root` could not read (missing, or
    refused: a symlink out of the root, not a file), by reason; a warning names the first few."""
    if image_root is None:
        return {}
    from llava_lightning.data.image_paths import ImagePathError, ImageRoot

    root, bad = ImageRoot(image_root), Counter()
    for q in questions:
        if "image" not in q:
            continue
        try:
            root.resolve(q["image"])
        except (FileNotFoundError, ImagePathError) as e:
            reason = "image missing" if isinstance(e, FileNotFoundError) else "image refused"
            bad[reason] += 1
            if sum(bad.values()) <= MAX_NAMED:
                log.warning("question %r: %s", q["question_id"], e)
    if bad:
        log.warning(
            "%d of %d questions have no readable image under %s (evaluate skips and counts them)",
            sum(bad.values()),
            len(questions),
            image_root,
        )
    return dict(bad)
