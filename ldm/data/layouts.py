"""Layouts, as a boxes column holds them and layout-to-image models take them: a list of boxes
``{"label": class, "box": [x0, y0, x1, y1]}`` in [0, 1] of the image, or its JSON text. Plain Python, so that
encode_latents' tasks check them where they are read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def parse_layout(layout: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A layout's boxes, checked: each a class ``label`` and a ``box`` [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1.
    A row without boxes (None) has the empty layout, which is the null condition."""
    try:
        boxes = json.loads(layout) if isinstance(layout, str) else [] if layout is None else layout
    except json.JSONDecodeError:
        boxes = None
    for b in boxes if isinstance(boxes, list) else [None]:
        box = b.get("box") if isinstance(b, dict) else None
        if not (
            isinstance(box, (list, tuple))
            and len(box) == 4
            and "label" in b
            and 0 <= box[0] < box[2] <= 1
            and 0 <= box[1] < box[3] <= 1
        ):
            raise ValueError(
                f'layout {layout!r}: expected a list of {{"label": class, "box": [x0, y0, x1, y1]}} '
                "with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the image)"
            )
    # A label is a class name: numeric ones (a dataset's category ids) are their text,
    # as the class vocabulary lists them.
    return [{**b, "label": str(b["label"])} for b in boxes]


def largest_first(boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A layout's boxes by decreasing area."""
    return sorted(boxes, key=lambda b: -(b["box"][2] - b["box"][0]) * (b["box"][3] - b["box"][1]))


def describe_layout(layout: str | list[dict[str, Any]] | None) -> str:
    """A layout for people: each box's class and corners, to two places."""
    return (
        "; ".join(f"{b['label']} [{' '.join(f'{v:.2f}' for v in b['box'])}]" for b in parse_layout(layout))
        or "(empty layout)"
    )


def grid_layouts(classes: Sequence[str], count: int, side: float = 0.34) -> list[str]:
    """``count`` one-box layouts (a box of ``side`` centred in a quadrant) of the classes in turn, in the
    quadrants in turn, so that every class is in every quadrant within ``4 x classes``: what a layout model
    draws when it is given no layouts."""
    layouts = []
    for i in range(count):
        quadrant = (
            i % len(classes) + i // len(classes)
        ) % 4  # the next pass over the classes puts each one quadrant further on
        cx, cy = (0.25, 0.75)[quadrant % 2], (0.25, 0.75)[quadrant // 2]
        box = [round(v, 4) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)]
        layouts.append(json.dumps([{"label": classes[i % len(classes)], "box": box}]))
    return layouts
