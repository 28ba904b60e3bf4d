"""Prompt adherence on synthetic scenes: generate for captions never seen in training, read the scene back
with the synthesizer's classifier, and score each attribute against chance, with a 95 % interval.

Each held-out scene is prompted with several seeds, its caption written in the training data's templates in
turn. The seeds of one prompt are not independent draws (a model that ignores a word fails every seed of
that prompt alike), so the interval counts each prompt's images as the design effect says they are worth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from ldm.synthetic.classify import read
from ldm.synthetic.scene import COLOURS, POSITIONS, SHAPES, TEMPLATES, Scene, caption

ATTRIBUTES = tuple(f.name for f in fields(Scene))  # colour, shape, position, background
CHANCE = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "position": 1 / len(POSITIONS),
    "background": 1 / len(COLOURS),
    "vertical": 1 / 2,
    "horizontal": 1 / 2,
}
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Prompt:
    scene: Scene
    template: int
    seed: int

    @property
    def text(self) -> str:
        return caption(self.scene, self.template)


def held_out_scenes(triples: Iterable[Sequence[str]], count: int, seed: int) -> list[Scene]:
    """Up to ``count`` scenes of held-out (colour, shape, background) triples, every position, picked at random."""
    scenes = [
        Scene(colour, shape, position, background)
        for colour, shape, background in sorted(map(tuple, triples))
        for position in POSITIONS
    ]
    if not scenes:
        raise ValueError(
            "no held-out (colour, shape, background) combinations: synthesize with data.holdout_fraction > 0"
        )
    picked = np.random.default_rng(seed).permutation(len(scenes))[:count]
    return [scenes[i] for i in sorted(picked)]


def held_out_prompts(scenes: Sequence[Scene], seeds: int, first_seed: int) -> list[Prompt]:
    """``seeds`` prompts per scene, with seeds ``first_seed``, ``first_seed + 1``, ...; the caption templates
    rotate over a scene's seeds and from scene to scene, so every template is used about equally."""
    if seeds < 1:
        raise ValueError(f"seeds per prompt must be >= 1, got {seeds}")
    return [
        Prompt(scene, (i + j) % len(TEMPLATES), first_seed + i * seeds + j)
        for i, scene in enumerate(scenes)
        for j in range(seeds)
    ]


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion: unlike p ± z·se it stays inside [0, 1] and is not empty at 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Exactly, the interval holds p; in floating point at p = 0 or 1 it can miss it by an ulp.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def clustered_interval(right: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """95 % interval for the mean of a prompts x seeds 0/1 array: Wilson's on the effective sample size
    n / deff, with Kish's design effect deff = 1 + (m - 1)·ρ and ρ the intra-prompt correlation (ANOVA
    estimate, clipped to [0, 1]). Independent seeds give n images' worth; seeds that always agree, one per prompt."""
    prompts, m = right.shape
    n, p = right.size, float(right.mean())
    if m > 1 and prompts > 1 and 0 < p < 1:
        within = float(right.var(axis=1, ddof=1).mean())
        between = float(right.mean(axis=1).var(ddof=1)) - within / m
        rho = min(1.0, max(0.0, between / (between + within))) if between + within > 0 else 0.0
        n = n / (1 + (m - 1) * rho)
    return wilson_interval(p * n, n, z)


def adherence(prompts: Sequence[Prompt], images: np.ndarray) -> tuple[dict[str, float], dict[str, list]]:
    """Scores and a per-image table. Scores, per attribute and per axis of the position: the fraction of
    images whose classified attribute is the prompted one, its 95 % interval (``_low``, ``_high``) and chance;
    ``all`` is right on all four, ``multi_object`` the fraction of images that hold more than one object. The
    table has a column per field: the prompt, its seed and template, and per attribute what was asked and seen."""
    if len(prompts) != len(images) or not len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(images)} images: need the same, non-zero number")
    groups: dict[Scene, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.scene, []).append(i)
    seeds = len(next(iter(groups.values())))
    if any(len(g) != seeds for g in groups.values()):
        raise ValueError(f"every scene needs the same number of seeds; got {sorted({len(g) for g in groups.values()})}")
    order = np.array([i for g in groups.values() for i in g])
    readings = [read(image) for image in images]
    wanted = [p.scene for p in prompts]
    seen = [r.scene for r in readings]
    right = {a: np.array([getattr(w, a) == getattr(s, a) for w, s in zip(wanted, seen)]) for a in ATTRIBUTES}
    for axis, part in (("vertical", 0), ("horizontal", 1)):
        right[axis] = np.array([w.position.split()[part] == s.position.split()[part] for w, s in zip(wanted, seen)])
    right["all"] = np.logical_and.reduce([right[a] for a in ATTRIBUTES])
    scores: dict[str, float] = {}
    for name, hits in right.items():
        low, high = clustered_interval(hits[order].reshape(-1, seeds).astype(np.float64))
        scores.update({f"{name}_accuracy": float(hits.mean()), f"{name}_low": low, f"{name}_high": high})
        if name in CHANCE:
            scores[f"{name}_chance"] = CHANCE[name]
    scores["multi_object"] = float(np.mean([r.objects > 1 for r in readings]))
    scores["no_object"] = float(np.mean([r.objects == 0 for r in readings]))
    scores["prompts"], scores["seeds"] = len(groups), seeds
    table: dict[str, list] = {
        "prompt": [p.text for p in prompts],
        "seed": [p.seed for p in prompts],
        "template": [p.template for p in prompts],
        "objects": [r.objects for r in readings],
    }
    for a in ATTRIBUTES:
        table[a], table[f"seen_{a}"] = [getattr(w, a) for w in wanted], [getattr(s, a) for s in seen]
    table["all_right"] = [bool(x) for x in right["all"]]
    return scores, table


LABELS = {"vertical": "top/bottom", "horizontal": "left/right", "all": "all four"}


def _score(scores: dict[str, float], name: str, digits: int) -> str:
    """``accuracy [low, high]`` of one score."""
    return (
        f"{scores[f'{name}_accuracy']:.{digits}f} "
        f"[{scores[f'{name}_low']:.{digits}f}, {scores[f'{name}_high']:.{digits}f}]"
    )


def headline(scores: dict[str, float]) -> str:
    """The scores in one line: each attribute, all four at once, with their intervals."""
    parts = [f"{LABELS.get(name, name)} {_score(scores, name, 2)}" for name in (*ATTRIBUTES, "all")]
    return f"{scores['prompts']} held-out prompts x {scores['seeds']} seeds: " + ", ".join(parts)


def describe(scores: dict[str, float]) -> list[str]:
    """The scores as a person reads them: one line per attribute, its interval and chance."""
    lines = [f"{scores['prompts']} held-out prompts x {scores['seeds']} seeds:"]
    for name in (*ATTRIBUTES, "vertical", "horizontal", "all"):
        chance = f" (chance {scores[f'{name}_chance']:.3f})" if f"{name}_chance" in scores else ""
        lines.append(f"  {LABELS.get(name, name):<11} {_score(scores, name, 3)}{chance}")
    lines.append(
        f"  more than one object in {scores['multi_object']:.3f} of the images, none in {scores['no_object']:.3f}"
    )
    return lines
