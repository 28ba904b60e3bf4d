"""The scene classifier on what generated and reconstructed images look like: stray pixels, speckle, blur,
halos and JPEG blocks must not change what it reads, and two objects must be counted as two."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ldm.synthetic.classify import read
from ldm.synthetic.render import render
from ldm.synthetic.scene import COLOURS, Scene, all_scenes

ATTRIBUTES = ("colour", "shape", "position", "background")


def _outliers(pixels, scene, rng):
    for y, x in rng.integers(pixels.shape[0], size=(2, 2)):
        pixels[y, x] = rng.integers(256, size=3)
    return pixels


def _speckle(pixels, scene, rng):
    return np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)


def _blur(pixels, scene, rng):
    return np.clip(ndimage.gaussian_filter(pixels.astype(float), (1.5, 1.5, 0)), 0, 255).round().astype(np.uint8)


def _halo(pixels, scene, rng):
    """A one-pixel ring of some other colour round the object, as a decoder's ringing leaves."""
    obj = np.linalg.norm(pixels.astype(float) - COLOURS[scene.background], axis=-1) > 44
    pixels[ndimage.binary_dilation(obj) & ~obj] = rng.integers(256, size=3)
    return pixels


def _jpeg50(pixels, scene, rng):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=50)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.mark.parametrize("corrupt", [_outliers, _speckle, _blur, _halo, _jpeg50], ids=lambda f: f.__name__.strip("_"))
def test_every_attribute_survives_what_generated_images_suffer(corrupt):
    rng = np.random.default_rng(0)
    scenes = all_scenes()
    picked = rng.permutation(len(scenes))[:300]
    readings = [read(corrupt(render(scenes[i], 64, 64, seed=int(i)), scenes[i], rng)) for i in picked]
    for attribute in ATTRIBUTES:
        right = np.mean(
            [getattr(r.scene, attribute) == getattr(scenes[i], attribute) for r, i in zip(readings, picked)]
        )
        assert right >= 0.98, f"{attribute} read right on {right:.3f} of images with {corrupt.__name__.strip('_')}"
    assert np.mean([r.objects == 1 for r in readings]) >= 0.98


def test_two_objects_are_counted_as_two():
    rng = np.random.default_rng(1)
    scenes = all_scenes()
    trials = [(scenes[a], scenes[b]) for a, b in rng.integers(len(scenes), size=(100, 2))]
    counted = 0
    for i, (first, second) in enumerate(trials):
        other = "bottom right" if first.position == "top left" else "top left"
        second = Scene(
            second.colour if second.colour != first.background else first.colour, second.shape, other, first.background
        )
        image = render(first, 64, 64, seed=i)
        extra = render(second, 64, 64, seed=10_000 + i)
        on_object = np.linalg.norm(extra.astype(float) - COLOURS[second.background], axis=-1) > 44
        image[on_object] = extra[on_object]
        counted += read(image).objects == 2
    assert counted / len(trials) >= 0.98
    # An empty image holds no object, and the reading says so.
    assert read(np.full((64, 64, 3), 128, np.uint8)).objects == 0
