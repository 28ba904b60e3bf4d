"""The evaluation metrics without Ray: prompt adherence read by the synthesizer's classifier, FID and KID."""

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from ldm.metrics.adherence import CHANCE, adherence, clustered_interval, held_out_prompts, held_out_scenes, wilson_interval
from ldm.metrics.distribution import frechet_distance, image_features, kernel_distance
from ldm.synthetic.render import render
from ldm.synthetic.scene import TEMPLATES, held_out_combinations, parse_caption


def test_adherence_scores_each_attribute_of_held_out_scenes_against_chance():
    scenes = held_out_scenes(held_out_combinations(0.15, 0), count=40, seed=0)
    assert len(scenes) == 40 and all((s.colour, s.shape, s.background) in held_out_combinations(0.15, 0) for s in scenes)
    prompts = held_out_prompts(scenes, seeds=3, first_seed=0)
    assert [parse_caption(p.text) for p in prompts] == [s for s in scenes for _ in range(3)]  # they say these scenes
    assert {p.template for p in prompts} == set(range(len(TEMPLATES))) and len({p.seed for p in prompts}) == 120

    rendered = np.stack([render(p.scene, 64, 64, seed=p.seed) for p in prompts])
    perfect, table = adherence(prompts, rendered)
    assert perfect["colour_accuracy"] == perfect["position_accuracy"] == perfect["all_accuracy"] == 1.0
    assert perfect["colour_low"] > 0.9 and perfect["colour_high"] == 1.0
    assert perfect["colour_chance"] == CHANCE["colour"] == 1 / 8 and perfect["position_chance"] == 1 / 4
    assert perfect["vertical_chance"] == 1 / 2 and perfect["multi_object"] == 0.0 and (perfect["prompts"], perfect["seeds"]) == (40, 3)
    assert table["prompt"] == [p.text for p in prompts] and all(table["all_right"])

    shuffled, _ = adherence(prompts, rendered[::-1])  # the images of other prompts
    assert shuffled["colour_accuracy"] < 0.5 and shuffled["colour_high"] < perfect["colour_low"]
    with pytest.raises(ValueError, match="synthesize with data.holdout_fraction > 0"):
        held_out_scenes([], count=4, seed=0)


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
    assert frechet_distance(real, shifted) == pytest.approx(frechet_distance(real, same) + 8 * 4.0, rel=0.1)  # + ||shift||²
    kid_same, _ = kernel_distance(real, same)
    kid_shifted, _ = kernel_distance(real, shifted)
    assert abs(kid_same) < 0.05 < kid_shifted


def test_image_features_come_from_any_transformers_vision_model(tmp_path):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    features = image_features(ViTModel.from_pretrained(tmp_path).eval(), ViTImageProcessor.from_pretrained(tmp_path), images, batch_size=2)
    assert features.shape == (5, 16) and np.isfinite(features).all()
