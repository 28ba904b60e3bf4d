"""First-stage models, losses and reconstruction metrics on their own (no Ray): presets, the encode/decode
interface, pretrained loading, the paper's loss terms, and that a tiny model learns."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUCKET, ROOT, write_lpips_weights

from ldm.losses.first_stage import FirstStageLoss, LossWeights
from ldm.losses.lpips import load_lpips
from ldm.metrics.reconstruction import evaluate_reconstruction
from ldm.models.first_stage import build_first_stage, decode, encode, factor, kind, last_layer, load_first_stage
from ldm.models.presets import FIRST_STAGE_PRESETS, first_stage_preset
from ldm.storage import Storage
from ldm.synthetic import all_scenes, render

# Parameters of each preset as built here. kl-f8 is exactly Stable Diffusion's VAE (the paper's kl-f8
# config: z=4, ch 128, mult 1,2,4,4, 2 res blocks); the tiny ones are the 0.95M CPU model.
PARAMETERS = {
    "kl-f4": 55_312_063,
    "kl-f8": 83_653_863,
    "kl-f16": 69_610_963,
    "vq-f4": 55_322_782,
    "vq-f8": 67_717_295,
    "tiny-kl-f4": 954_567,
    "tiny-vq-f4": 953_231,
}


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_PRESETS))
def test_every_preset_builds_with_its_recorded_size(name):
    spec = first_stage_preset(name)
    with torch.device("meta"):  # the shapes, without allocating 80M parameters
        model = build_first_stage(spec)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert kind(model) == spec.kind and factor(model) == spec.factor == int(name.rsplit("f", 1)[1])


def test_presets_refuse_nonsense():
    with pytest.raises(ValueError, match="unknown first-stage preset 'kl-f7'"):
        first_stage_preset("kl-f7")
    with pytest.raises(ValueError, match="num_vq_embeddings"):
        first_stage_preset("tiny-kl-f4", kind="vq")
    assert first_stage_preset("tiny-kl-f4", latent_channels=8).latent_channels == 8


@pytest.mark.parametrize("name", ["tiny-kl-f4", "tiny-vq-f4"])
def test_one_interface_encodes_and_decodes_both_kinds(name):
    model = build_first_stage(first_stage_preset(name), logvar_bias=-6.0 if name.startswith("tiny-kl") else None)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    encoded = encode(model, images)
    assert encoded.mode().shape == encoded.sample().shape == (2, 4, 16, 16)
    assert decode(model, encoded.sample()).shape == images.shape
    if name.startswith("tiny-kl"):
        assert encoded.logvar.mean().item() == pytest.approx(-6.0, abs=0.5)  # starts nearly deterministic
        assert not torch.equal(encoded.sample(), encoded.sample()) and encoded.kl().shape == (2,)
    else:
        assert torch.equal(encoded.sample(), encoded.mode()) and encoded.indices.numel() == 2 * 16 * 16


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("name", ["tiny-kl-f4", "tiny-vq-f4"])
def test_a_saved_model_reloads_bit_identically_through_the_pretrained_path(name, where, tmp_path, request):
    model = build_first_stage(first_stage_preset(name)).eval()
    model.save_pretrained(tmp_path / "saved")
    if where == "s3":
        storage = Storage(root=f"s3://{BUCKET}/first-stage", endpoint_url=request.getfixturevalue("s3_server"))
        fs, root = storage.fsspec(storage.url(name))
        fs.put(str(tmp_path / "saved"), root, recursive=True)
        loaded = load_first_stage(storage.url(name), storage)
    else:
        loaded = load_first_stage(str(tmp_path / "saved"))
    assert type(loaded) is type(model)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode(loaded, encode(loaded, images).mode()), decode(model, encode(model, images).mode()))


def test_loading_refuses_what_is_not_a_first_stage(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=8,
    ).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="not an AutoencoderKL or VQModel"):
        load_first_stage(str(tmp_path / "unet"))


def synthetic_batch(n=8, size=64, seed=0):
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    images = [render(scenes[int(i)], size, size, int(i)) for i in rng.integers(len(scenes), size=n)]
    pixels = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    return pixels / 127.5 - 1


@pytest.mark.parametrize("name", ["tiny-kl-f4", "tiny-vq-f4"])
def test_the_paper_loss_switches_the_discriminator_on_at_disc_start(name):
    spec = first_stage_preset(name)
    model = build_first_stage(spec)
    loss = FirstStageLoss(spec.kind, LossWeights(disc_start=10))
    images = synthetic_batch(2)
    encoded = encode(model, images)
    reconstructions = decode(model, encoded.sample())
    before, logs = loss.generator(images, reconstructions, encoded, 9, last_layer(model))
    assert "g_loss" not in logs and loss.discriminator_loss(images, reconstructions, 9)[0] is None
    assert ("kl_loss" if spec.kind == "kl" else "codebook_loss") in logs
    after, logs = loss.generator(images, reconstructions, encoded, 10, last_layer(model))
    assert 0 < logs["d_weight"] < 1e4 * 0.5 and torch.isfinite(after)
    d_loss, d_logs = loss.discriminator_loss(images, reconstructions, 10)
    assert d_loss.requires_grad and {"logits_real", "logits_fake"} <= set(d_logs)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_foreground_weighting_raises_the_cost_of_errors_on_the_object_only():
    images = synthetic_batch(2)
    wrong_object = images.clone()
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    on_object = ((images - background).abs().amax(dim=1, keepdim=True) > 0.1).expand_as(images)
    wrong_object[on_object] = -images[on_object]
    plain, _ = FirstStageLoss("kl", LossWeights()).reconstruction(images, wrong_object)
    weighted, _ = FirstStageLoss("kl", LossWeights(foreground_weight=5)).reconstruction(images, wrong_object)
    assert torch.allclose(weighted[on_object], 5 * plain[on_object]) and torch.equal(
        weighted[~on_object], plain[~on_object]
    )


def test_a_tiny_first_stage_learns_and_the_metrics_see_it():
    torch.manual_seed(0)
    spec = first_stage_preset("tiny-kl-f4")
    model = build_first_stage(spec, logvar_bias=-6.0)
    loss = FirstStageLoss("kl", LossWeights(foreground_weight=5, mse_weight=1))
    images = synthetic_batch(8)
    optimizer = torch.optim.Adam([*model.parameters(), loss.logvar], lr=2e-3)
    start = evaluate_reconstruction(model, [images])
    for step in range(40):
        encoded = encode(model, images)
        value, logs = loss.generator(images, decode(model, encoded.sample()), encoded, step, last_layer(model))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    end = evaluate_reconstruction(model, [images[:4], images[4:]])
    assert end.images == 8 and end.psnr > start.psnr + 1.0 and end.ssim > start.ssim + 0.1


def test_codebook_usage_counts_the_codes_a_vq_model_uses():
    model = build_first_stage(first_stage_preset("tiny-vq-f4"))
    metrics = evaluate_reconstruction(model, [synthetic_batch(4)])
    assert 0 < metrics.codebook_usage <= 1 and 1 <= metrics.codebook_perplexity <= 256
    assert set(metrics.as_dict("val/")) == {
        "val/psnr",
        "val/ssim",
        "val/images",
        "val/codebook_usage",
        "val/codebook_perplexity",
    }


def test_lpips_loads_from_the_files_users_have_and_measures_distortion(tmp_path):
    files = write_lpips_weights(tmp_path)
    lpips = load_lpips(files)
    # The same network saved whole, as taming-transformers / the lpips package name it (net.sliceK.N.*).
    whole = {}
    for key, value in torch.load(files[0], weights_only=True).items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            whole[f"net.slice{1 + sum(index > t for t in (3, 8, 15, 22))}.{key.removeprefix('features.')}"] = value
    from safetensors.torch import load_file

    whole.update(load_file(files[1]))
    torch.save(whole, tmp_path / "lpips_whole.pth")
    images = synthetic_batch(2)
    slightly = (images + 0.05 * torch.randn_like(images)).clamp(-1, 1)
    badly = (images + 0.5 * torch.randn_like(images)).clamp(-1, 1)
    assert torch.equal(lpips(images, slightly), load_lpips([str(tmp_path / "lpips_whole.pth")])(images, slightly))
    assert lpips(images, images).abs().max() < 1e-6
    assert (0 < lpips(images, slightly)).all() and (lpips(images, slightly) < lpips(images, badly)).all()
    assert load_lpips([]) is None
    with pytest.raises(ValueError, match=r"lack 5 tensor.*lin0\.model\.1\.weight"):
        load_lpips(files[:1])


def test_the_perceptual_term_joins_the_reconstruction_loss_frozen_and_unsaved(tmp_path):
    lpips = load_lpips(write_lpips_weights(tmp_path))
    images = synthetic_batch(2)
    reconstructions = (images + 0.2 * torch.randn_like(images)).clamp(-1, 1).requires_grad_()
    plain, logs = FirstStageLoss("kl", LossWeights()).reconstruction(images, reconstructions)
    loss = FirstStageLoss("kl", LossWeights(perceptual_weight=2.0), lpips)
    error, perceptual_logs = loss.reconstruction(images, reconstructions)
    distance = lpips(images, reconstructions)
    assert torch.allclose(error - plain, 2.0 * distance.expand_as(plain))
    assert logs == {} and perceptual_logs == {"p_loss": pytest.approx(distance.mean().item())}
    error.mean().backward()
    assert reconstructions.grad.abs().sum() > 0 and not any(p.requires_grad for p in lpips.parameters())
    assert set(loss.state_dict()) == set(FirstStageLoss("kl", LossWeights()).state_dict())  # no VGG in checkpoints


def test_a_hub_id_takes_the_same_path_from_the_hub_cache(tmp_path):
    """Offline, a hub id resolves from the Hugging Face cache exactly as an online user's download would land."""
    model = build_first_stage(first_stage_preset("tiny-kl-f4"))
    model.save_pretrained(tmp_path / "local")
    repo = tmp_path / "hub" / "models--acme--tiny-ldm"
    shutil.copytree(tmp_path / "local", repo / "snapshots" / ("0" * 40) / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    check = f"""
import torch
from ldm.models.first_stage import load_first_stage
from ldm.storage import weights_digest
loaded = load_first_stage("acme/tiny-ldm", subfolder="vae")
local = load_first_stage({str(tmp_path / "local")!r})
assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), local.state_dict().values()))
assert weights_digest("acme/tiny-ldm", subfolder="vae") == weights_digest({str(tmp_path / "local")!r})
print("same")
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "same", result.stderr[-2000:]
