"""The synthetic corpus generator and its classifier, without Ray."""

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ldm.synthetic import all_scenes, caption, classify, parse_caption, render
from ldm.synthetic.corpus import DEFECTS, image_bytes, plan_rows, scene_of
from ldm.synthetic.scene import held_out_combinations

BAD = {d: 0.02 for d in DEFECTS}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_captions_name_every_attribute_and_parse_back():
    for i, scene in enumerate(all_scenes()):
        assert parse_caption(caption(scene, i)) == scene
    assert parse_caption("a photo of my cat") is None
    assert parse_caption(None) is None


@pytest.mark.parametrize("resolution", [32, 64])
def test_classifier_recovers_the_caption_from_clean_rendered_jpegs(resolution):
    rows = [r for r in plan_rows(600, resolution, seed=3, bad_rows={}, holdout_fraction=0.15, rows_per_shard=100)]
    correct = sum(classify(decode(image_bytes(r, 95))) == parse_caption(r["TEXT"]) for r in rows)
    assert correct / len(rows) >= 0.99


def test_classifier_reads_each_attribute_from_the_pixels_not_a_fixed_answer():
    scenes = all_scenes()
    for field in ("colour", "shape", "position", "background"):
        seen = {getattr(classify(render(s, 64, 64, seed=i)), field) for i, s in enumerate(scenes[::11])}
        assert seen == {getattr(s, field) for s in scenes[::11]}


def test_plan_is_seeded_and_injects_each_defect_at_its_fraction():
    a = plan_rows(500, 64, seed=7, bad_rows=BAD, holdout_fraction=0.15, rows_per_shard=100)
    b = plan_rows(500, 64, seed=7, bad_rows=BAD, holdout_fraction=0.15, rows_per_shard=100)
    assert a == b
    assert image_bytes(a[5], 95) == image_bytes(b[5], 95)
    assert plan_rows(500, 64, seed=8, bad_rows=BAD, holdout_fraction=0.15, rows_per_shard=100) != a
    assert Counter(r["defect"] for r in a if r["defect"]) == {d: 10 for d in DEFECTS}


def test_held_out_combinations_never_appear():
    held = held_out_combinations(0.15, seed=7)
    assert len(held) == round(0.15 * len({(s.colour, s.shape, s.background) for s in all_scenes()}))
    rows = plan_rows(2000, 32, seed=7, bad_rows={}, holdout_fraction=0.15, rows_per_shard=1000)
    assert not {(r["colour"], r["shape"], r["background"]) for r in rows} & held
    assert all(parse_caption(r["TEXT"]) == scene_of(r) for r in rows)


def test_keys_follow_img2dataset_shard_and_index_widths():
    keys = [r["key"] for r in plan_rows(250, 32, seed=0, bad_rows={}, holdout_fraction=0.1, rows_per_shard=100)]
    assert keys[0] == "0000000" and keys[99] == "0000099" and keys[100] == "0000100" and keys[249] == "0000249"
    keys = [r["key"] for r in plan_rows(30, 32, seed=0, bad_rows={}, holdout_fraction=0.1, rows_per_shard=10)]
    assert keys[:2] == ["000000", "000001"] and keys[-1] == "000029"


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="no_such_defect"):
        plan_rows(100, 64, seed=0, bad_rows={"no_such_defect": 0.1}, holdout_fraction=0.1, rows_per_shard=10)
    with pytest.raises(ValueError, match="rows_per_shard"):
        plan_rows(100, 64, seed=0, bad_rows={}, holdout_fraction=0.1, rows_per_shard=20000)
