"""What generated synthetic scenes show, read back by the synthesizer's classifier: how close an
unconditional model's scenes are to its training data's, whether a class-conditional model draws the class it
was given, and whether a layout model draws its object in the layout's box.

Each generated image is read back by the synthesizer's classifier (``ldm.synthetic.classify``); the
distribution of each scene attribute (object colour, shape, position, background) is compared with the
training data's, read from the training rows' captions (as many as images are generated: fewer would add their
own sampling noise to the distance), by total variation: half the L1 distance between the two distributions, 0 when
equal, 1 when disjoint. Per attribute rather than over whole scenes, whose 600-odd combinations a few hundred images
cannot estimate. An image is clean when the classifier finds exactly one object in it. A class ("red circle") is drawn
when the largest object has its colour and its shape; chance is one over the number of classes. A layout is
followed as far as the largest object's box overlaps the layout's largest box (IoU) and lies in its quadrant,
against what a model that ignored the layout would score: the same measures between the layouts themselves,
each against every other one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from ldm.data.layouts import largest_first, parse_layout
from ldm.synthetic.classify import read
from ldm.synthetic.scene import Scene, class_name

ATTRIBUTES = ("colour", "shape", "position", "background")


def total_variation(p: Counter, q: Counter) -> float:
    """Half the L1 distance between two empirical distributions given as counts."""
    n, m = sum(p.values()), sum(q.values())
    return 0.5 * sum(abs(p[k] / n - q[k] / m) for k in set(p) | set(q))


def scene_distribution(real: Sequence[Scene], generated: np.ndarray) -> dict[str, float]:
    """``tv_<attribute>`` for each attribute, ``tv`` their mean, ``clean_fraction`` (one object) and the counts."""
    if not len(real) or not len(generated):
        raise ValueError(f"scene distribution needs real scenes and generated images: {len(real)} and {len(generated)}")
    readings = [read(image) for image in generated]
    metrics = {
        f"tv_{a}": total_variation(Counter(getattr(s, a) for s in real), Counter(getattr(r.scene, a) for r in readings))
        for a in ATTRIBUTES
    }
    metrics["tv"] = float(np.mean([metrics[f"tv_{a}"] for a in ATTRIBUTES]))
    metrics["clean_fraction"] = float(np.mean([r.objects == 1 for r in readings]))
    return {**metrics, "images": len(readings), "real_scenes": len(real)}


def class_accuracy(classes: Sequence[str], generated: np.ndarray, known: int) -> dict[str, float]:
    """How often image i shows ``classes[i]`` (colour and shape), against chance among ``known`` classes."""
    if len(classes) != len(generated) or not len(classes):
        raise ValueError(f"{len(classes)} classes for {len(generated)} images")
    readings = [read(image) for image in generated]
    drawn = [class_name(r.scene) for r in readings]
    colour = [d.split()[0] == c.split()[0] for d, c in zip(drawn, classes)]
    shape = [d.split()[-1] == c.split()[-1] for d, c in zip(drawn, classes)]
    return {
        "accuracy": float(np.mean([d == c for d, c in zip(drawn, classes)])),
        "chance": 1.0 / known,
        "colour_accuracy": float(np.mean(colour)),
        "shape_accuracy": float(np.mean(shape)),
        "clean_fraction": float(np.mean([r.objects == 1 for r in readings])),
        "images": len(readings),
    }


def box_iou(a: Sequence[float] | None, b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when ``a`` is None (no object found)."""
    if a is None:
        return 0.0
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def quadrant(box: Sequence[float]) -> str:
    """The quadrant of a box's centre, as the synthetic captions name positions."""
    return f"{'top' if box[1] + box[3] < 1 else 'bottom'} {'left' if box[0] + box[2] < 1 else 'right'}"


def layout_accuracy(layouts: Sequence[str], generated: np.ndarray) -> dict[str, float]:
    """How well image i follows ``layouts[i]``'s largest box: ``iou`` (mean box IoU), ``position_accuracy``
    (the object in the box's quadrant), ``class_accuracy`` (its colour and shape); ``chance_iou`` and
    ``chance_position`` are the same measures between the layouts' boxes, each against every other layout's."""
    if len(layouts) != len(generated) or len(layouts) < 2:
        raise ValueError(f"{len(layouts)} layouts for {len(generated)} images: layout accuracy needs at least 2")
    wanted = [largest_first(parse_layout(layout))[0] for layout in layouts]
    readings = [read(image) for image in generated]
    boxes = [b["box"] for b in wanted]
    others = [(a, b) for i, a in enumerate(boxes) for j, b in enumerate(boxes) if i != j]
    return {
        "iou": float(np.mean([box_iou(r.box, b) for r, b in zip(readings, boxes)])),
        "position_accuracy": float(
            np.mean([r.objects > 0 and r.scene.position == quadrant(b) for r, b in zip(readings, boxes)])
        ),
        "class_accuracy": float(np.mean([class_name(r.scene) == w["label"] for r, w in zip(readings, wanted)])),
        "chance_iou": float(np.mean([box_iou(a, b) for a, b in others])),
        "chance_position": float(np.mean([quadrant(a) == quadrant(b) for a, b in others])),
        "clean_fraction": float(np.mean([r.objects == 1 for r in readings])),
        "images": len(readings),
    }
