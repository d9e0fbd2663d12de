"""Procedural image datasets, deterministic by seed, for demos, tests and benchmarks.

    python -m vit.datasets shapes --out data/shapes --per-class 300 --size 64 --seed 0

Writes OUT/<class>/<class>_00000.png ... Each image is drawn at twice its size and
downsampled (anti-aliasing): a shape in a dark ink of random hue on a lighter background
(paper, a flat tint, a gradient or a soft texture), with random size, position, rotation
(roughly upright, within 25 degrees, as people draw), aspect, fill or outline, stroke
width, hand-drawn wobble of the outline, noise and blur, so that a model trained on it
recognises shapes people draw or photograph on paper.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("arrow", "circle", "cross", "heart", "hexagon", "moon", "pentagon", "square", "star", "triangle")


def _polygon(sides: int, phase: float = 0.0) -> np.ndarray:
    t = np.arange(sides) * 2 * math.pi / sides + phase
    return np.stack([np.cos(t), np.sin(t)], 1)


def outline(shape: str) -> np.ndarray:
    """The shape's closed outline in unit coordinates (about [-1, 1]^2), as (n, 2) points."""
    if shape == "circle":
        return _polygon(96)
    if shape == "triangle":
        return _polygon(3, -math.pi / 2) * 1.1 + [0, 0.2]
    if shape == "square":
        return _polygon(4, math.pi / 4) * 1.2
    if shape == "pentagon":
        return _polygon(5, -math.pi / 2)
    if shape == "hexagon":
        return _polygon(6)
    if shape == "star":
        outer, inner = _polygon(5, -math.pi / 2), _polygon(5, -math.pi / 2 + math.pi / 5) * 0.42
        return np.stack([outer, inner], 1).reshape(-1, 2)
    if shape == "cross":
        a, b = 0.32, 1.0
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        )
    if shape == "arrow":
        return np.array([[-1, -0.28], [0.15, -0.28], [0.15, -0.7], [1, 0], [0.15, 0.7], [0.15, 0.28], [-1, 0.28]])
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, -y], 1) / 16.5 + [0, 0.1]
    if shape == "moon":
        t = np.linspace(-0.5 * math.pi, 0.5 * math.pi, 60)
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        inner = np.stack([0.45 * np.cos(t[::-1]), np.sin(t[::-1])], 1)
        return np.concatenate([outer, inner]) + [-0.25, 0]
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _resample(points: np.ndarray, n: int) -> np.ndarray:
    """n points evenly spaced along the closed outline (so wobble bends straight edges too)."""
    closed = np.concatenate([points, points[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    pos = np.concatenate([[0], np.cumsum(seg)])
    at = np.linspace(0, pos[-1], n, endpoint=False)
    return np.stack([np.interp(at, pos, closed[:, 0]), np.interp(at, pos, closed[:, 1])], 1)


def _wobble(points: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Smooth random displacement along the outline: a hand-drawn look."""
    pts = _resample(points, 160)
    t = np.linspace(0, 2 * math.pi, len(pts), endpoint=False)
    offset = np.zeros_like(pts)
    for k in range(1, 5):
        offset += rng.normal(0, amount / k, size=(1, 2)) * np.stack(
            [np.sin(k * t + rng.uniform(0, 6.3)), np.cos(k * t + rng.uniform(0, 6.3))], 1
        )
    return pts + offset


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light background: paper, a flat tint, a gradient between two tints, or a soft texture."""
    kind = rng.choice(["paper", "flat", "gradient", "texture"], p=[0.3, 0.3, 0.25, 0.15])
    light = lambda: rng.uniform(150, 255, 3)  # noqa: E731
    if kind == "paper":
        return np.broadcast_to(rng.uniform(225, 255, 3), (size, size, 3)).astype(np.float32)
    c1 = light()
    if kind == "flat":
        return np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    c2 = light()
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / size
        w = ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a) + 0.71) / 1.42
        return (c1 * (1 - w[..., None]) + c2 * w[..., None]).astype(np.float32)
    cells = int(rng.integers(3, 10))
    blobs = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    w = np.asarray(blobs, dtype=np.float32)[..., None] / 255
    return c1 * (1 - w) + c2 * w


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    """A dark colour of any hue: the shape is always darker than its background, as ink,
    pencil or a marker on paper is. With every colour random instead (shape and background
    alike), models trained from scratch sat at chance for thousands of steps: there is then
    nothing in the pixels a first step can hold on to."""
    hue = rng.uniform(0, 1, 3)
    return tuple(int(v) for v in hue / hue.max() * rng.uniform(20, 120))


def render(shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One random image of ``shape``, ``size`` x ``size`` RGB."""
    big = size * 2
    bg = _background(rng, big)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    pts = outline(shape)
    if rng.random() < 0.6:
        pts = _wobble(pts, rng, rng.uniform(0.02, 0.08))
    a = float(np.clip(rng.normal(0, math.radians(12)), -math.radians(25), math.radians(25)))  # drawn roughly upright
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    stretch = np.diag(rng.uniform(0.85, 1.15, 2))
    scale = rng.uniform(0.28, 0.42) * big
    centre = rng.uniform(0.5 - 0.1, 0.5 + 0.1, 2) * big
    xy = (pts @ stretch @ rot.T) * scale + centre
    xy = [tuple(p) for p in xy.tolist()]
    colour = _ink(rng)
    if rng.random() < 0.55:
        draw.polygon(xy, fill=colour)
    else:
        width = int(rng.integers(max(2, big // 40), max(3, big // 12)))
        draw.line(xy + [xy[0], xy[1]], fill=colour, width=width, joint="curve")
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1)))
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.6:
        arr = arr + rng.normal(0, rng.uniform(2, 14), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_drawing(shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A shape as a person draws it on the app's canvas: a dark wobbly stroke on white."""
    big = size * 4
    img = Image.new("RGB", (big, big), "white")
    pts = _wobble(outline(shape), rng, rng.uniform(0.02, 0.06))
    a = float(np.clip(rng.normal(0, math.radians(12)), -math.radians(25), math.radians(25)))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    xy = (pts @ rot.T) * rng.uniform(0.28, 0.4) * big + rng.uniform(0.42, 0.58, 2) * big
    xy = [tuple(p) for p in xy.tolist()]
    ImageDraw.Draw(img).line(
        xy + [xy[0], xy[1]], fill=(20, 20, 20), width=int(big * rng.uniform(0.02, 0.04)), joint="curve"
    )
    return img.resize((size, size), Image.Resampling.LANCZOS)


def make_shapes(
    out: str | Path,
    per_class: int = 300,
    size: int = 64,
    seed: int = 0,
    classes: tuple[str, ...] = SHAPES,
    style: str = "varied",
) -> Path:
    """Write ``per_class`` images of each shape under ``out/<class>/``; returns ``out``.

    ``style``: "varied" (the training distribution) or "drawing" (strokes on white)."""
    """Write ``per_class`` images of each shape under ``out/<class>/``; returns ``out``."""
    out = Path(out)
    for ci, shape in enumerate(classes):
        d = out / shape
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, ci])
        for i in range(per_class):
            paint = render if style == "varied" else render_drawing
            paint(shape, rng, size).save(d / f"{shape}_{i:05d}.png")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m vit.datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("kind", choices=["shapes"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_shapes(a.out, a.per_class, a.size, a.seed)
    print(f"wrote {a.per_class * len(SHAPES)} images of {len(SHAPES)} shapes to {a.out}")


if __name__ == "__main__":
    main()
