"""Random scenes of the synthetic shapes data and their pictures: 1-3 shapes on a 3x3 grid, drawn
to reproducible JPEG bytes, from independent random streams of a seed."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
# 3x3 grid, row-major; the index is (row * 3 + col).
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
BACKGROUND = (238, 236, 230)
JPEG_QUALITY = 90
SUPERSAMPLE = 2

# Independent random streams: changing how many captions are drawn never changes the eval set.
STREAM_CAPTIONS, STREAM_INSTRUCT, STREAM_EVAL, STREAM_MC_TRAIN, STREAM_VAL = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Shape:
    """One shape in a scene: its type, colour name, grid cell, size and offset (in pixels)."""

    shape: str
    colour: str
    position: str
    size: float
    dx: float
    dy: float


Scene = list[Shape]


def rng_for(seed: int, stream: int) -> np.random.Generator:
    """A generator for one named stream of a seed (streams do not overlap)."""
    return np.random.default_rng([seed, stream])


def random_scene(rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    """1-3 shapes with distinct types, colours and cells, sorted in reading order."""
    n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    shapes = rng.permutation(len(SHAPES))[:n]
    colours = rng.permutation(len(COLOURS))[:n]
    cells = rng.permutation(len(POSITIONS))[:n]
    colour_names = list(COLOURS)
    # Each shape fills most of its cell (one 32 px patch of the tiny tower at 96 px), near the centre:
    # circle / square and triangle / star cover about the same area, so only the outline tells them
    # apart, and with sizes 0.30-0.40 and offsets of 0.08 one demo seed in three called circles squares.
    scene = [
        Shape(
            shape=SHAPES[int(s)],
            colour=colour_names[int(c)],
            position=POSITIONS[int(p)],
            size=round(float(rng.uniform(0.38, 0.44)), 4),
            dx=round(float(rng.uniform(-0.04, 0.04)), 4),
            dy=round(float(rng.uniform(-0.04, 0.04)), 4),
        )
        for s, c, p in zip(shapes, colours, cells)
    ]
    return sorted(scene, key=lambda sh: POSITIONS.index(sh.position))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -np.pi / 2 + i * np.pi / 5
        points.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
    return points


def render(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene (supersampled, then downscaled for smooth edges)."""
    big = image_size * SUPERSAMPLE
    cell = big / 3
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for sh in scene:
        idx = POSITIONS.index(sh.position)
        row, col = divmod(idx, 3)
        cx = (col + 0.5 + sh.dx) * cell
        cy = (row + 0.5 + sh.dy) * cell
        r = sh.size * cell
        fill = COLOURS[sh.colour]
        if sh.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif sh.shape == "square":
            s = r * 0.85
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif sh.shape == "triangle":
            draw.polygon(
                [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=fill
            )
        elif sh.shape == "star":
            draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
        else:  # pragma: no cover - SHAPES is closed
            raise ValueError(f"unknown shape {sh.shape!r}")
    return img.reduce(SUPERSAMPLE)


def jpeg_bytes(img: Image.Image) -> bytes:
    """Encode with fixed settings so the bytes are reproducible."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=0)
    return buf.getvalue()
