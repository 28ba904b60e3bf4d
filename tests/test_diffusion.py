"""The latent diffusion library without Ray: presets, the noise schedule, the objective, guidance sampling."""

import numpy as np
import pytest
import torch
from conftest import BUCKET

from ldm.diffusion.objective import DenoisingLoss, DiffusionObjective, drop_captions, noise_scheduler, sample_latents
from ldm.diffusion.sampling import generate_images, sampler, task_pipeline
from ldm.models.first_stage import build_first_stage
from ldm.models.presets import TEXT_TO_IMAGE_PRESETS, first_stage_preset, text_to_image_preset
from ldm.models.text_to_image import build_text_encoder, build_unet, set_attention, set_trainable
from ldm.synthetic.scene import all_scenes, caption
from ldm.text.tokenizer import train_wordpiece
from pipelines.driver.config import compose
from pipelines.stages.train_ldm.loop import training_schedule


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, unet, text_encoder",
    [
        # The paper's: UNet 872M + LDMBert 669M without its LM head (BERT vocabulary 30522, 77 positions);
        # tiny's τθ is a BertModel, its pooler left out (frozen, as LDMBert's LM head is).
        ("txt2img-1p4b", 872_300_484, 668_724_480),
        ("mid", 219_467_140, 40_874_496),
        ("tiny", 5_925_124, 4_313_728),
    ],
)
def test_presets_build_with_their_recorded_sizes(name, unet, text_encoder):
    spec = text_to_image_preset(name)
    with torch.device("meta"):  # sizes without allocating 1.5B parameters
        built_text = build_text_encoder(spec.text_encoder, 30522, 77)
        built_unet = build_unet(spec.unet, 4, 32, spec.text_encoder.width)
    set_trainable(built_text, True)
    assert (
        parameters(built_unet) == unet
        and sum(p.numel() for p in built_text.parameters() if p.requires_grad) == text_encoder
    )
    assert built_unet.config.cross_attention_dim == spec.text_encoder.width


def test_paper_preset_matches_the_compvis_config():
    spec = TEXT_TO_IMAGE_PRESETS["txt2img-1p4b"]
    assert spec.unet.block_out_channels == (320, 640, 1280, 1280) and spec.unet.layers_per_block == 2
    assert spec.unet.attention_levels == (0, 1, 2)  # attention_resolutions 4, 2, 1 of a 32x32 latent
    assert (spec.text_encoder.layers, spec.text_encoder.width) == (32, 1280)
    with pytest.raises(ValueError, match="unknown text-to-image preset 'huge'.*tiny"):
        text_to_image_preset("huge")


def test_without_cross_attention_the_unet_attends_where_the_papers_unconditional_ones_do():
    """Not on the full latent grid (the paper's unconditional UNets: attention_resolutions 8, 4, 2), where
    self-attention over every position took 2.7x a tiny-preset step."""
    spec = text_to_image_preset("tiny").unet
    unet = build_unet(spec, 4, 16, None)
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert TEXT_TO_IMAGE_PRESETS["txt2img-1p4b"].unet.self_attention_levels == (1, 2, 3)  # downsampling 2, 4, 8
    crossed = build_unet(spec, 4, 16, 32)
    assert [type(b).__name__ for b in crossed.down_blocks] == [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]


def test_linear_schedule_is_ldms_and_the_cosine_option_exists():
    betas = noise_scheduler("linear", "epsilon").betas.double()
    compvis = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(betas, compvis, atol=1e-7)
    assert noise_scheduler("cosine", "epsilon").config.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="prediction_type"):
        noise_scheduler("linear", "sample")


@pytest.mark.parametrize("overrides", [["stage=train_ldm"], ["experiment=quality"]], ids=["default", "quality"])
def test_sampling_starts_where_training_left_nothing_of_the_image(overrides):
    """The cause of prompts whose position words were ignored: LDM's linear schedule keeps √ᾱ_T = 0.068 of z0
    at t = T, so on a 16 x 16 latent the model learned to read the object's place from z_T, and at sampling
    time put the object wherever the starting noise hinted, whatever the prompt said. The configured schedule
    must leave nothing of z0 at the sampler's first timestep."""
    noise_config = compose(*overrides).stage
    noise_config = noise_config.train_ldm.noise if "train_ldm" in noise_config else noise_config.noise
    schedule = training_schedule(noise_config)
    first = sampler("ddim", schedule.config)
    first.set_timesteps(25)
    start = first.timesteps[:1]
    z0, noise = torch.randn(8, 4, 16, 16) * 3, torch.randn(8, 4, 16, 16)
    assert torch.equal(schedule.add_noise(z0, noise, start.expand(8)), noise)
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        noise_scheduler("linear", "epsilon", zero_terminal_snr=True)


def test_latents_are_drawn_from_the_stored_posterior_and_scaled():
    mean, logvar = torch.full((4096, 4, 2, 2), 3.0), torch.full((4096, 4, 2, 2), np.log(0.25))
    z = sample_latents(
        {"latent_mean": mean.half(), "latent_logvar": logvar.half()}, 0.5, torch.Generator().manual_seed(0)
    )
    assert z.mean().item() == pytest.approx(1.5, abs=0.01) and z.std().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(sample_latents({"latent": mean}, 2.0), mean * 2)  # VQ: deterministic


def test_caption_dropout_uses_the_empty_caption_at_its_rate():
    ids = torch.arange(10_000 * 3).reshape(10_000, 3) + 100
    empty = torch.tensor([1, 2, 0])
    dropped = drop_captions(ids, empty, 0.1, torch.Generator().manual_seed(0))
    replaced = (dropped == empty).all(dim=1)
    assert replaced.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(dropped[~replaced], ids[~replaced]) and drop_captions(ids, empty, 0.0) is ids


def tiny_model(vocab=50, prediction_type="epsilon", snr_gamma=None):
    torch.manual_seed(0)
    spec = text_to_image_preset(
        "tiny", unet={"block_out_channels": [32, 32, 32]}, text_encoder={"width": 32, "heads": 2, "ffn": 64}
    )
    text_encoder = build_text_encoder(spec.text_encoder, vocab, 8)
    unet = build_unet(spec.unet, 4, 8, 32)
    objective = DiffusionObjective(noise_scheduler("linear", prediction_type), snr_gamma)
    return DenoisingLoss(unet, text_encoder, objective, train_text_encoder=True)


@pytest.mark.parametrize("prediction_type, snr_gamma", [("epsilon", None), ("v_prediction", None), ("epsilon", 5.0)])
def test_the_objective_trains_unet_and_text_encoder(prediction_type, snr_gamma):
    model = tiny_model(prediction_type=prediction_type, snr_gamma=snr_gamma)
    set_trainable(model.text_encoder, True)
    z0 = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 50, (16, 8), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(30):
        loss = model(z0, ids, torch.Generator().manual_seed(step % 3))  # three fixed noise draws
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert all(p.grad is not None for p in model.text_encoder.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.text_encoder.parameters() if not p.requires_grad)  # pooler / LM head


def tiny_pipeline():
    """The library's pipeline around tiny random models: a WordPiece tokenizer, τθ, UNet, tiny-kl-f4."""
    captions = [caption(scene, template) for scene in all_scenes()[:200] for template in range(3)]
    tokenizer = train_wordpiece(captions, vocab_size=80, max_length=77)
    torch.manual_seed(0)
    spec = text_to_image_preset(
        "tiny", unet={"block_out_channels": [32, 32, 32]}, text_encoder={"width": 32, "heads": 2, "ffn": 64}
    )
    text_encoder, unet = build_text_encoder(spec.text_encoder, len(tokenizer), 77), build_unet(spec.unet, 4, 8, 32)
    first_stage = build_first_stage(first_stage_preset("tiny-kl-f4"))
    schedule = noise_scheduler("linear", "epsilon").config
    return task_pipeline(
        unet.eval(), text_encoder.eval(), tokenizer, first_stage.eval(), 0.5, sampler("ddim", schedule)
    ), schedule


def test_guided_sampling_is_seeded_per_image_and_guidance_changes_the_result():
    pipeline, schedule = tiny_pipeline()
    prompts = [
        "a red circle in the top left on a blue background",
        "a white square at the bottom right, black background",
    ]
    run = lambda seeds, scale=4.0: generate_images(pipeline, prompts, seeds, steps=4, guidance_scale=scale)  # noqa: E731
    first = run([0, 1])
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8  # the f4 first stage's resolution
    assert np.array_equal(first, run([0, 1]))
    alone = generate_images(pipeline, prompts[1:], [1], steps=4, guidance_scale=4.0, batch_size=1)[0]
    assert np.abs(first[1].astype(int) - alone).max() <= 2  # the same noise; a batch of one rounds differently
    assert not np.array_equal(first, run([0, 1], scale=1.0)) and not np.array_equal(first[0], run([5, 1])[0])
    pipeline.scheduler = sampler("dpm++", schedule)
    assert run([0, 1]).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler("euler", schedule)


def _tiny_text_models():
    """Tiny random-init text models as their hubs ship them: (the whole saved model, its subfolder, its text tower)."""
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, T5Config, T5ForConditionalGeneration

    text = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(
        CLIPConfig(
            text_config={**text, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2},
            vision_config={**text, "image_size": 16, "patch_size": 8},
        )
    )
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=60, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    bert = BertModel(BertConfig(**text))
    # A whole CLIP model in a diffusers-style subfolder gives its text tower; T5 its encoder.
    return {"bert": (bert, None, bert), "clip": (clip, "text_encoder", clip.text_model), "t5": (t5, None, t5.encoder)}


@pytest.mark.parametrize("kind", ["bert", "clip", "t5"])
def test_a_pretrained_text_encoder_loads_from_s3_like_a_directory_and_stays_frozen(kind, s3_server, tmp_path):
    from ldm.models.text_to_image import context_width, load_text_encoder
    from ldm.storage import Storage
    from ldm.text.tokenizer import load_tokenizer

    whole, subfolder, tower = _tiny_text_models()[kind]
    folder = tmp_path / kind / (subfolder or "")
    whole.save_pretrained(folder)
    tokenizer = train_wordpiece([caption(s) for s in all_scenes()], vocab_size=60, max_length=16)
    tokenizer.save_pretrained(tmp_path / kind / "tokenizer")
    storage = Storage(root=f"s3://{BUCKET}/text-encoder", endpoint_url=s3_server)
    fs, path = storage.fsspec(storage.url(kind))
    fs.put(str(tmp_path / kind), path, recursive=True)
    encoder = load_text_encoder(storage.url(kind), storage, subfolder)
    local = load_text_encoder(str(tmp_path / kind), subfolder=subfolder)
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), local.parameters()))
    ids = torch.tensor(
        [
            load_tokenizer(storage.url(kind), storage, "tokenizer")(
                "a red circle", padding="max_length", max_length=16
            ).input_ids
        ]
    )
    assert torch.equal(encoder(ids)[0], tower.eval()(ids)[0])  # the same per-token features as the tower it came from

    set_trainable(encoder, False)
    spec = text_to_image_preset("tiny", unet={"block_out_channels": [32, 32, 32]})
    model = DenoisingLoss(
        build_unet(spec.unet, 4, 8, context_width(encoder)),
        encoder,
        DiffusionObjective(noise_scheduler("linear", "epsilon")),
        False,
    )
    model(torch.randn(2, 4, 8, 8), torch.randint(0, 60, (2, 8)), torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in model.unet.parameters())


def test_math_attention_computes_what_the_fused_kernel_does():
    model = tiny_model().eval()
    z, ids, t = torch.randn(2, 4, 8, 8), torch.randint(3, 50, (2, 8)), torch.tensor([10, 500])
    context = model.text_encoder(ids)[0]
    fused = model.unet(z, t, encoder_hidden_states=context).sample
    set_attention(model.unet, "auto", torch.device("cpu"))  # on CPU: math
    assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"AttnProcessor"}
    assert torch.allclose(model.unet(z, t, encoder_hidden_states=context).sample, fused, atol=1e-5)
    with pytest.raises(ValueError, match=r"attention='flash': choose one of \('auto', 'sdpa', 'math'\)"):
        set_attention(model.unet, "flash", torch.device("cpu"))
