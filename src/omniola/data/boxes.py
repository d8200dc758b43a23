"""Box annotations as text: what a grounding record's answer says about its picture.

One object per line, its words then its box, in the convention of Qwen-VL's grounding data: corners as integers
from 0 to 1000 of the picture's width and height::

    red circle (120,80),(410,390)
    small blue rectangle (600,500),(980,700)

Such an answer can be learnt as text by the next-token loss (the model then says where things are), and it is what
the `ground` objective (`omniola.training.grounding`) reads to pull each visual token onto the words of what it
shows. Any data with boxes (COCO, Visual Genome, ...) converts to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .ola_format import RecordError

__all__ = ["SCALE", "format_boxes", "parse_boxes"]

SCALE = 1000  # box coordinates are in thousandths of the picture's width and height
_LINE = re.compile(r"^\s*(?P<words>[^()]*?)\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")


def format_boxes(objects: Iterable[tuple[str, Sequence[float]]], width: float, height: float) -> str:
    """`(words, (x0, y0, x1, y1) in pixels)` pairs -> the annotation text (coordinates clipped to the picture)."""
    lines = []
    for words, (x0, y0, x1, y1) in objects:
        if not words.strip() or "(" in words or "\n" in words:
            raise RecordError(f"box words must be a non-empty line without parentheses, got {words!r}")
        corners = [round(min(max(v / size, 0.0), 1.0) * SCALE)
                   for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]
        lines.append("{} ({},{}),({},{})".format(" ".join(words.split()), *corners))
    return "\n".join(lines)


def parse_boxes(text: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The annotation text -> `(words, (x0, y0, x1, y1) as fractions of the picture)` per object.

    Raises:
        RecordError: a line is not `words (x0,y0),(x1,y1)` with 0 <= x0 < x1 <= 1000 and 0 <= y0 < y1 <= 1000.
    """
    objects = []
    for number, line in enumerate(text.strip().splitlines(), 1):
        match = _LINE.match(line)
        if match is None or not match["words"]:
            raise RecordError(f"box line {number} is not `words (x0,y0),(x1,y1)`: {line!r}")
        x0, y0, x1, y1 = (int(match.group(i)) for i in range(2, 6))
        if not (0 <= x0 < x1 <= SCALE and 0 <= y0 < y1 <= SCALE):
            raise RecordError(f"box line {number}: corners must satisfy 0 <= x0 < x1 <= {SCALE} and "
                              f"0 <= y0 < y1 <= {SCALE}: {line!r}")
        objects.append((match["words"], (x0 / SCALE, y0 / SCALE, x1 / SCALE, y1 / SCALE)))
    return objects
