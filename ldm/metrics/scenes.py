"""What generated synthetic scenes show, read back by the synthesizer's classifier: how close an
unconditional model's scenes are to its training data's, and whether a class-conditional model draws the
class it was given.

Each generated image is read back by the synthesizer's classifier (``ldm.synthetic.classify``); the
distribution of each scene attribute (object colour, shape, position, background) is compared with the
training data's, read from captions of held-out rows (a hash-chosen, so unbiased, sample of the same data), by
total variation: half the L1 distance between the two distributions, 0 when equal, 1 when disjoint. Per
attribute rather than over whole scenes, whose 600-odd combinations a few hundred images cannot estimate.
An image is clean when the classifier finds exactly one object in it. A class ("red circle") is drawn when
the largest object has its colour and its shape; chance is one over the number of classes.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

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
    metrics = {f"tv_{a}": total_variation(Counter(getattr(s, a) for s in real), Counter(getattr(r.scene, a) for r in readings))
               for a in ATTRIBUTES}
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
    return {"accuracy": float(np.mean([d == c for d, c in zip(drawn, classes)])), "chance": 1.0 / known,
            "colour_accuracy": float(np.mean(colour)), "shape_accuracy": float(np.mean(shape)),
            "clean_fraction": float(np.mean([r.objects == 1 for r in readings])), "images": len(readings)}
