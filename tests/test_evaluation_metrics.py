"""The evaluation metrics without Ray: prompt adherence and layout accuracy read by the synthesizer's
classifier, FID and KID; and the layout τθ's tokens."""

import json

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from ldm.data.layouts import grid_layouts
from ldm.metrics.adherence import (
    CHANCE,
    adherence,
    clustered_interval,
    held_out_prompts,
    held_out_scenes,
    wilson_interval,
)
from ldm.metrics.distribution import frechet_distance, image_features, kernel_distance
from ldm.metrics.scenes import layout_accuracy
from ldm.models.conditioners import ClassEmbedder, LayoutEncoder
from ldm.synthetic.render import object_box, render
from ldm.synthetic.scene import TEMPLATES, all_scenes, class_name, held_out_combinations, parse_caption


def test_adherence_scores_each_attribute_of_held_out_scenes_against_chance():
    scenes = held_out_scenes(held_out_combinations(0.15, 0), count=40, seed=0)
    assert len(scenes) == 40 and all(
        (s.colour, s.shape, s.background) in held_out_combinations(0.15, 0) for s in scenes
    )
    prompts = held_out_prompts(scenes, seeds=3, first_seed=0)
    assert [parse_caption(p.text) for p in prompts] == [s for s in scenes for _ in range(3)]  # they say these scenes
    assert {p.template for p in prompts} == set(range(len(TEMPLATES))) and len({p.seed for p in prompts}) == 120

    rendered = np.stack([render(p.scene, 64, 64, seed=p.seed) for p in prompts])
    perfect, table = adherence(prompts, rendered)
    assert perfect["colour_accuracy"] == perfect["position_accuracy"] == perfect["all_accuracy"] == 1.0
    assert perfect["colour_low"] > 0.9 and perfect["colour_high"] == 1.0
    assert perfect["colour_chance"] == CHANCE["colour"] == 1 / 8 and perfect["position_chance"] == 1 / 4
    assert (
        perfect["vertical_chance"] == 1 / 2
        and perfect["multi_object"] == 0.0
        and (perfect["prompts"], perfect["seeds"]) == (40, 3)
    )
    assert table["prompt"] == [p.text for p in prompts] and all(table["all_right"])

    shuffled, _ = adherence(prompts, rendered[::-1])  # the images of other prompts
    assert shuffled["colour_accuracy"] < 0.5 and shuffled["colour_high"] < perfect["colour_low"]
    with pytest.raises(ValueError, match="synthesize with data.holdout_fraction > 0"):
        held_out_scenes([], count=4, seed=0)


def test_layout_accuracy_reads_the_drawn_box_against_the_layouts_own_chance():
    scenes = all_scenes()[::23][:24]
    layouts = [
        json.dumps([{"label": class_name(s), "box": [v / 64 for v in object_box(s, 64, 64, seed=i)]}])
        for i, s in enumerate(scenes)
    ]
    rendered = np.stack([render(s, 64, 64, seed=i) for i, s in enumerate(scenes)])
    perfect = layout_accuracy(layouts, rendered)  # the images rendered in these boxes
    assert (
        perfect["iou"] > 0.8
        and perfect["position_accuracy"] == perfect["class_accuracy"] == perfect["clean_fraction"] == 1.0
    )
    assert 0 < perfect["chance_iou"] < 0.3 and 0.1 < perfect["chance_position"] < 0.5 and perfect["images"] == 24
    shuffled = layout_accuracy(layouts, rendered[::-1])  # drawn for other layouts
    assert shuffled["iou"] < 0.5 and shuffled["position_accuracy"] < 0.6 and shuffled["class_accuracy"] < 0.2
    with pytest.raises(ValueError, match="at least 2"):
        layout_accuracy(layouts[:1], rendered[:1])


def test_layout_tokens_are_class_and_corner_cells_of_the_largest_boxes_padded_to_max_objects():
    encoder = LayoutEncoder(num_classes=3, width=16, layers=1, heads=2, max_objects=2, grid=4, classes=["a", "b", "c"])
    pad = 3 + 16
    small, large, middle = (
        {"label": "a", "box": [0.0, 0.0, 0.25, 0.25]},
        {"label": "c", "box": [0.5, 0.25, 1.0, 0.75]},
        {"label": "b", "box": [0.0, 0.5, 0.5, 1.0]},
    )
    tokens = encoder.tokens([[small], [small, large, middle], None, "[]"]).tolist()
    # class, then top-left and bottom-right cells (row * 4 + column) after the classes;
    # a box ending on a cell edge stays in the cell before it
    assert tokens[0] == [0, 3 + 0, 3 + 0, pad, pad, pad]
    assert tokens[1] == [2, 3 + 1 * 4 + 2, 3 + 2 * 4 + 3, 1, 3 + 2 * 4 + 0, 3 + 3 * 4 + 1]  # the two largest of three
    assert tokens[2] == tokens[3] == encoder.null_tokens(1)[0].tolist() == [pad] * 6  # no boxes: the null layout
    assert encoder(torch.tensor(tokens))[0].shape == (4, 6, 16)
    with pytest.raises(ValueError, match=r"unknown class\(es\) \['z'\]"):
        encoder.tokens([[{"label": "z", "box": [0, 0, 1, 1]}]])
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        encoder.tokens(['[{"label": "a", "box": [0.5, 0, 0.5, 1]}]'])
    # A held-out row may name a class no training row did: not strict, its box is left out (a class: the null one).
    assert encoder.tokens([[small, {"label": "z", "box": [0, 0, 1, 1]}]], strict=False).tolist() == [tokens[0]]
    classes = ClassEmbedder(num_classes=2, width=4, classes=["a", "b"])
    assert classes.tokens(["b", None, "z"], strict=False).tolist() == [1, 2, 2] and classes.tokens([0]).tolist() == [0]
    # Numeric labels (a dataset's category ids) are their text, as the class vocabulary lists them.
    numeric = LayoutEncoder(num_classes=1, width=16, layers=1, heads=2, max_objects=1, grid=4, classes=["7"])
    assert numeric.tokens([[{"label": 7, "box": [0.0, 0.0, 0.25, 0.25]}]]).tolist() == [[0, 1, 1]]
    # The layouts a layout model draws when given none: the classes in turn, each in every quadrant within 4 passes.
    drawn = [json.loads(layout)[0] for layout in grid_layouts(["a", "b", "c"], 12)]
    assert [d["label"] for d in drawn] == ["a", "b", "c"] * 4
    assert all(len({tuple(d["box"]) for d in drawn if d["label"] == name}) == 4 for name in "abc")
    assert len({tuple(d["box"]) for d in drawn[:3]}) == 3  # consecutive classes in different quadrants


def test_interval_covers_the_truth_95_percent_of_the_time_and_counts_agreeing_seeds_once():
    rng = np.random.default_rng(0)
    # Independent seeds: the interval holds the true rate in ~95 % of experiments, as a Wilson interval should.
    truth, covered = 0.8, 0
    for _ in range(2000):
        low, high = clustered_interval((rng.random((100, 3)) < truth).astype(float))
        covered += low <= truth <= high
    assert 0.93 <= covered / 2000 <= 0.97
    # Seeds that always agree (a model that decides by the prompt alone): 100 prompts are worth 100 images, not 300.
    per_prompt = (rng.random(100) < truth).astype(float)
    agreeing = clustered_interval(np.repeat(per_prompt[:, None], 3, axis=1))
    assert agreeing == pytest.approx(wilson_interval(per_prompt.sum(), 100))
    independent = clustered_interval((rng.random((100, 3)) < per_prompt.mean()).astype(float))
    assert agreeing[1] - agreeing[0] > 1.5 * (independent[1] - independent[0])
    # Wilson at the edges: never outside [0, 1], never empty.
    assert wilson_interval(0, 50)[0] == 0.0 < wilson_interval(0, 50)[1] < 0.1
    assert all(low <= k / 30 <= high for k in range(31) for low, high in [wilson_interval(k, 30)])
    assert 0.9 < wilson_interval(50, 50)[0] < wilson_interval(50, 50)[1] == 1.0


def test_fid_and_kid_are_zero_for_one_distribution_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    real, same = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    shifted = same + 2.0
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, same) < 1.0
    assert frechet_distance(real, shifted) == pytest.approx(
        frechet_distance(real, same) + 8 * 4.0, rel=0.1
    )  # + ||shift||²
    kid_same, _ = kernel_distance(real, same)
    kid_shifted, _ = kernel_distance(real, shifted)
    assert abs(kid_same) < 0.05 < kid_shifted


def test_image_features_come_from_any_transformers_vision_model(tmp_path):
    torch.manual_seed(0)
    model = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    features = image_features(
        ViTModel.from_pretrained(tmp_path).eval(), ViTImageProcessor.from_pretrained(tmp_path), images, batch_size=2
    )
    assert features.shape == (5, 16) and np.isfinite(features).all()
