"""Prompt adherence on synthetic scenes: generate for captions never seen in training, read the scene back
with the synthesizer's deterministic classifier, and score each attribute against chance."""

from __future__ import annotations

from dataclasses import fields
from typing import Iterable, Sequence

import numpy as np

from ldm.synthetic.classify import classify
from ldm.synthetic.scene import COLOURS, POSITIONS, SHAPES, Scene, caption

ATTRIBUTES = tuple(f.name for f in fields(Scene))  # colour, shape, position, background
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "position": 1 / len(POSITIONS), "background": 1 / len(COLOURS)}


def held_out_scenes(triples: Iterable[Sequence[str]], count: int, seed: int) -> list[Scene]:
    """Up to ``count`` scenes of held-out (colour, shape, background) triples, every position, picked at random."""
    scenes = [Scene(colour, shape, position, background) for colour, shape, background in sorted(map(tuple, triples)) for position in POSITIONS]
    if not scenes:
        raise ValueError("no held-out (colour, shape, background) combinations: synthesize with data.holdout_fraction > 0")
    picked = np.random.default_rng(seed).permutation(len(scenes))[:count]
    return [scenes[i] for i in sorted(picked)]


def prompts_for(scenes: Sequence[Scene]) -> list[str]:
    return [caption(scene) for scene in scenes]


def adherence(scenes: Sequence[Scene], images: np.ndarray) -> dict[str, float]:
    """Per attribute: the fraction of images whose classified attribute is the prompted one, and its chance
    level; ``all`` is the fraction right on all four."""
    if len(scenes) != len(images) or not len(scenes):
        raise ValueError(f"{len(scenes)} scenes and {len(images)} images: need the same, non-zero number")
    seen = [classify(image) for image in images]
    right = {a: np.array([getattr(s, a) == getattr(g, a) for s, g in zip(scenes, seen)]) for a in ATTRIBUTES}
    scores = {f"{a}_accuracy": float(right[a].mean()) for a in ATTRIBUTES}
    scores.update({f"{a}_chance": CHANCE[a] for a in ATTRIBUTES})
    scores["all_accuracy"] = float(np.logical_and.reduce([right[a] for a in ATTRIBUTES]).mean())
    return scores
