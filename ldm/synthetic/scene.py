"""What a synthetic image shows, and the captions that say it.

A scene is one object (colour, shape) in one quadrant on a plain background. Captions name all four
attributes, so text conditioning is learnable and a generated image can be scored attribute by attribute.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np

# Well separated in RGB so that JPEG and jitter never move a pixel to another name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")

TEMPLATES = (
    "{a_colour} {colour} {shape} in the {position} on {a_background} {background} background",
    "{colour} {shape} at the {position}, {background} background",
    "a photo of {a_colour} {colour} {shape} in the {position} of {a_background} {background} background",
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_scenes() -> list[Scene]:
    """Every scene whose object is visible (object colour differs from the background)."""
    return [Scene(c, s, p, b) for c, s, p, b in itertools.product(COLOURS, SHAPES, POSITIONS, COLOURS) if c != b]


def held_out_combinations(fraction: float, seed: int) -> set[tuple[str, str, str]]:
    """(colour, shape, background) triples kept out of the training corpus, for prompt-adherence evaluation."""
    triples = sorted({(s.colour, s.shape, s.background) for s in all_scenes()})
    count = int(round(fraction * len(triples)))
    picked = np.random.default_rng([seed, 1]).choice(len(triples), size=count, replace=False)
    return {triples[i] for i in picked}


def class_name(scene: Scene) -> str:
    """The object's class, as class-conditional and layout-to-image models learn it: its colour and shape."""
    return f"{scene.colour} {scene.shape}"


def caption(scene: Scene, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(
        **scene.as_dict(), a_colour=_article(scene.colour), a_background=_article(scene.background)
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_COLOUR = "|".join(COLOURS)
_OBJECT = re.compile(rf"\b({_COLOUR})\s+({'|'.join(SHAPES)})\b")
_BACKGROUND = re.compile(rf"\b({_COLOUR})\s+background\b")
_POSITION = re.compile(rf"\b({'|'.join(POSITIONS)})\b")


def parse_caption(text: str | None) -> Scene | None:
    """The scene a caption describes, or None when it does not name all four attributes."""
    if not text:
        return None
    lowered = text.lower()
    obj, background, position = _OBJECT.search(lowered), _BACKGROUND.search(lowered), _POSITION.search(lowered)
    if not (obj and background and position):
        return None
    return Scene(obj.group(1), obj.group(2), position.group(1), background.group(1))
