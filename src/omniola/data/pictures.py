"""Pictures drawn by omniola: one to three shapes of varied size, place, aspect and colour on varied backgrounds.

A picture is planned as a plain JSON-able spec (:func:`plan_picture`, seeded) and drawn from it
(:func:`draw_picture`, a pure function of the spec), so the tiny-world builder can plan thousands cheaply, render
them in any number of processes with identical bytes, and keep the spec in each record's `meta`.

Two styles share the shapes and the palette and differ in everything else a picture has:

- `"train"`: white, a light tint, a tint with pixel noise, or horizontal / vertical gradients and stripes;
- `"oot"` (out of template): checkers, speckles, concentric rings and diagonal stripes, which training never shows.

Shapes: circle, rectangle (aspect 1:2 to 2:1), triangle (pointing up, down, left or right), 8 to 44 pixels across,
placed anywhere without overlapping; colours are the palette's with a little jitter per shape.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from .boxes import format_boxes

__all__ = ["COLORS", "PICTURE_STYLES", "SHAPES", "boxes", "caption", "draw_background", "draw_picture",
           "plan_background", "plan_picture", "where"]

# easy-VQA's exact palette (its images use these RGB values), used by every picture and video of the tiny world.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "teal": (0, 128, 128), "brown": (165, 42, 42), "gray": (128, 128, 128), "black": (0, 0, 0),
}
SHAPES = ("circle", "rectangle", "triangle")
PICTURE_STYLES = ("train", "oot")
SIZE = 64  # pixels, square canvas
MIN_SHAPE, MAX_SHAPE = 8, 44
COLOR_JITTER = 16  # per channel
BACKGROUNDS = {"train": ("white", "tint", "noise", "gradient", "stripes"),
               "oot": ("checker", "speckle", "rings", "diagonal")}


def _light(rng: random.Random) -> list[int]:
    """A pale colour, far from every palette colour (backgrounds never look like a shape's colour)."""
    return [rng.randint(205, 255) for _ in range(3)]


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> list[int]:
    return [min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb]


def plan_background(rng: random.Random, style: str) -> dict[str, Any]:
    """A background spec of `style` (pale colours, a seed, a period and an angle), for :func:`draw_background`."""
    if style not in PICTURE_STYLES:
        raise ConfigError(f"unknown picture style {style!r}; choose one of {PICTURE_STYLES}")
    kind = rng.choice(BACKGROUNDS[style])
    return {"kind": kind, "colors": [_light(rng), _light(rng)], "seed": rng.getrandbits(32),
            "period": rng.randint(4, 12), "angle": rng.choice((45, 135) if kind == "diagonal" else (0, 90))}


def plan_picture(rng: random.Random, style: str, *, shapes: int | None = None) -> dict[str, Any]:
    """A picture spec: background and 1-3 shapes of distinct kinds and colours, not overlapping.

    Args:
        rng: The picture's own random stream.
        style: `"train"` or `"oot"` (which backgrounds).
        shapes: How many shapes (default: 1 half of the time, else 2 or 3).
    """
    if style not in PICTURE_STYLES:
        raise ConfigError(f"unknown picture style {style!r}; choose one of {PICTURE_STYLES}")
    count = shapes or (1 if rng.random() < 0.5 else rng.choice((2, 2, 3)))
    if not 1 <= count <= len(SHAPES):
        raise ConfigError(f"a picture holds 1 to {len(SHAPES)} shapes, got {count}")
    background = plan_background(rng, style)
    for _ in range(1000):  # rejection sampling until the boxes do not overlap
        placed = []
        top = MAX_SHAPE if count == 1 else 30 if count == 2 else 24
        for name, color in zip(rng.sample(SHAPES, count), rng.sample(tuple(COLORS), count)):
            size = rng.randint(MIN_SHAPE, top)
            aspect = rng.uniform(0.5, 2.0) if name == "rectangle" else 1.0
            w, h = (size, max(MIN_SHAPE // 2, round(size / aspect))) if aspect >= 1 else (round(size * aspect), size)
            w, h = max(4, w), max(4, h)
            cx, cy = rng.uniform(w / 2 + 1, SIZE - w / 2 - 1), rng.uniform(h / 2 + 1, SIZE - h / 2 - 1)
            placed.append({"shape": name, "color": color, "rgb": _jitter(rng, COLORS[color]), "cx": round(cx, 1),
                           "cy": round(cy, 1), "w": w, "h": h, "point": rng.choice(("up", "down", "left", "right"))})
        if not any(_overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1 :]):
            return {"style": style, "size": SIZE, "background": background, "shapes": placed}
    raise ConfigError("could not place the shapes of a picture without overlap")


def _overlap(a: dict, b: dict, margin: float = 3.0) -> bool:
    return (abs(a["cx"] - b["cx"]) < (a["w"] + b["w"]) / 2 + margin
            and abs(a["cy"] - b["cy"]) < (a["h"] + b["h"]) / 2 + margin)


def draw_background(bg: dict, size: int = SIZE) -> Image.Image:
    """The background of a spec from :func:`plan_background` (RGB, `size` x `size`)."""
    first, second = (np.asarray(c, np.float64) for c in bg["colors"])
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    kind = bg["kind"]
    if kind == "white":
        pixels = np.full((size, size, 3), 255.0)
    elif kind == "tint":
        pixels = np.broadcast_to(first, (size, size, 3)).copy()
    elif kind == "noise":
        noise = np.random.default_rng(bg["seed"]).normal(0.0, 6.0, (size, size, 1))
        pixels = first + noise
    else:
        angle = np.deg2rad(bg["angle"])
        along = (x * np.cos(angle) + y * np.sin(angle)) / (size * 1.42)
        if kind == "gradient":
            t = (along - along.min()) / (along.max() - along.min())
        elif kind in ("stripes", "diagonal"):
            t = ((x * np.cos(angle) + y * np.sin(angle)) // bg["period"]) % 2
        elif kind == "rings":
            t = (np.hypot(x - size / 2, y - size / 2) // bg["period"]) % 2
        elif kind == "checker":
            t = ((x // bg["period"]) + (y // bg["period"])) % 2
        else:  # speckle: sparse darker dots
            t = (np.random.default_rng(bg["seed"]).random((size, size)) < 0.05).astype(np.float64)
            second = first * 0.8
        pixels = first + t[..., None] * (second - first)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "RGB")


def draw_picture(spec: dict) -> Image.Image:
    """The picture of a spec from :func:`plan_picture` (RGB, `size` x `size`)."""
    image = draw_background(spec["background"], spec["size"])
    draw = ImageDraw.Draw(image)
    for s in spec["shapes"]:
        x0, y0 = round(s["cx"] - s["w"] / 2), round(s["cy"] - s["h"] / 2)
        x1, y1 = x0 + s["w"] - 1, y0 + s["h"] - 1
        fill = tuple(s["rgb"])
        if s["shape"] == "circle":
            draw.ellipse((x0, y0, x0 + s["w"] - 1, y0 + s["w"] - 1), fill=fill)
        elif s["shape"] == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            points = {"up": [(mx, y0), (x1, y1), (x0, y1)], "down": [(x0, y0), (x1, y0), (mx, y1)],
                      "left": [(x0, my), (x1, y0), (x1, y1)], "right": [(x0, y0), (x1, my), (x0, y1)]}
            draw.polygon(points[s["point"]], fill=fill)
    return image


def where(shape: dict, size: int = SIZE) -> str:
    """Where a shape is, in words: "top left", "middle", "bottom", ..."""
    col = ("left", "", "right")[min(2, int(3 * shape["cx"] / size))]
    row = ("top", "", "bottom")[min(2, int(3 * shape["cy"] / size))]
    return f"{row} {col}".strip() or "middle"


def caption(spec: dict) -> str:
    """A caption naming each shape's size, colour, kind and place: "a small red circle at the top left and ..."."""
    parts = []
    for s in sorted(spec["shapes"], key=lambda s: s["cx"]):
        size = "small" if max(s["w"], s["h"]) < 18 else "big" if max(s["w"], s["h"]) > 30 else "medium"
        place = where(s)
        parts.append(f"a {size} {s['color']} {s['shape']} {'in the' if place == 'middle' else 'at the'} {place}")
    return " and ".join(parts)


def boxes(spec: dict) -> str:
    """Each shape's colour, kind and box as a grounding answer (`omniola.data.boxes`): "red circle (120,80),..."."""
    objects = []
    for s in spec["shapes"]:
        x0, y0 = round(s["cx"] - s["w"] / 2), round(s["cy"] - s["h"] / 2)  # as draw_picture draws it
        objects.append((f"{s['color']} {s['shape']}", (x0, y0, x0 + s["w"], y0 + s["h"])))
    return format_boxes(objects, spec["size"], spec["size"])
