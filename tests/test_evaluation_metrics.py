"""The evaluation metrics without Ray: prompt adherence read by the synthesizer's classifier, FID and KID."""

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from ldm.metrics.adherence import CHANCE, adherence, held_out_scenes, prompts_for
from ldm.metrics.distribution import frechet_distance, image_features, kernel_distance
from ldm.synthetic.render import render
from ldm.synthetic.scene import held_out_combinations, parse_caption


def test_adherence_scores_each_attribute_of_held_out_scenes_against_chance():
    scenes = held_out_scenes(held_out_combinations(0.15, 0), count=40, seed=0)
    assert len(scenes) == 40 and all((s.colour, s.shape, s.background) in held_out_combinations(0.15, 0) for s in scenes)
    assert [parse_caption(p) for p in prompts_for(scenes)] == scenes  # the prompts say exactly these scenes

    rendered = np.stack([render(scene, 64, 64, seed=i) for i, scene in enumerate(scenes)])
    perfect = adherence(scenes, rendered)
    assert perfect["colour_accuracy"] == perfect["position_accuracy"] == perfect["background_accuracy"] == 1.0
    assert perfect["colour_chance"] == CHANCE["colour"] == 1 / 8 and perfect["position_chance"] == 1 / 4

    shuffled = adherence(scenes, rendered[::-1])  # the images of other prompts
    assert shuffled["colour_accuracy"] < 0.5 and shuffled["all_accuracy"] < perfect["all_accuracy"]
    with pytest.raises(ValueError, match="synthesize with data.holdout_fraction > 0"):
        held_out_scenes([], count=4, seed=0)


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
