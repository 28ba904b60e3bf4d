"""The GPU code paths, taken on a CPU: ``torch.cuda`` monkeypatched to describe a GPU, CUDA-sized random states,
the ``meta`` device, models saved in half precision. Each test is a crash or silent error a first GPU run would hit."""

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

from ldm.data.images import normalise
from ldm.devices import autocast_dtype, device_for, enable_tf32, restore_optimizer, restore_rng, rng_state
from ldm.flops import peak_flops
from ldm.models.first_stage import encode_pixels, for_inference, load_first_stage
from ldm.models.text_to_image import encode_text, load_text_encoder
from ldm.storage import Storage
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.stages.encode_latents.encoder import Encoder, encoder_device
from pipelines.stages.train_autoencoder.loop import training_parts
from pipelines.worker.checkpoint import saved_streams

CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """``torch.cuda`` as it answers on a machine with one GPU of the given name and compute capability."""

    def describe(name: str, capability: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True: capability >= (8, 0) or including_emulation,
        )

    return describe


@pytest.fixture
def fp32_precision():
    """TF32 as it was before the test: it is process-wide."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_mfu_divides_by_the_peak_of_the_precision_that_trains(gpu, fp32_precision):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    assert peak_flops(CUDA, torch.bfloat16) == 989e12
    assert peak_flops(CUDA, None) == peak_flops(CUDA, torch.float32) == 66.9e12  # plain fp32: 15x below bf16's
    assert enable_tf32(CUDA)
    assert peak_flops(CUDA, torch.float32) == 494.7e12  # fp32 matmuls on the TF32 tensor cores
    gpu("Tesla V100-SXM2-32GB", (7, 0))
    assert peak_flops(CUDA, torch.float32) == 15.7e12  # no TF32 cores: its fp32 rate, TF32 flag or not
    gpu("Some Future GPU", (12, 0))
    assert peak_flops(CUDA, torch.bfloat16) is None  # not in the table: no MFU rather than a wrong one


def test_tf32_is_turned_on_only_where_the_gpu_has_it(gpu, fp32_precision):
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not enable_tf32(torch.device("cpu"))
    gpu("Tesla T4", (7, 5))
    assert not enable_tf32(CUDA) and torch.backends.cuda.matmul.fp32_precision == "ieee"
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    assert (
        enable_tf32(CUDA)
        and torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
    )


def test_one_autocast_rule_downgrades_bf16_on_gpus_without_it(gpu):
    cpu, said = torch.device("cpu"), []
    assert autocast_dtype(cpu, "bf16", "stage.precision") == torch.bfloat16  # train_ldm's default on CPU: 1.35x fp32
    assert (
        autocast_dtype(cpu, "auto", "stage.precision") is None
        and autocast_dtype(cpu, "fp32", "stage.precision") is None
    )
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    assert (
        autocast_dtype(CUDA, "auto", "stage.precision")
        == autocast_dtype(CUDA, "bf16", "stage.precision")
        == torch.bfloat16
    )
    gpu("Tesla V100-SXM2-32GB", (7, 0))  # bf16 only emulated: slower than fp32
    assert autocast_dtype(CUDA, "auto", "stage.precision", said.append) is None and not said
    assert autocast_dtype(CUDA, "bf16", "stage.precision", said.append) is None
    assert said == [
        "warning: stage.precision=bf16 but Tesla V100-SXM2-32GB has no native bf16 (compute capability 7.0, bf16 needs "
        "8.0): training in fp32"
    ]
    with pytest.raises(ValueError, match=r"stage.precision='fp16': choose one of \('auto', 'bf16', 'fp32'\)"):
        autocast_dtype(CUDA, "fp16", "stage.precision")


def test_a_gpu_asked_for_where_there_is_none_is_refused_by_name():
    assert device_for("auto").type == "cpu" and device_for("meta").type == "meta"
    with pytest.raises(ValueError, match="device=cuda: torch .* sees no CUDA GPU here"):
        device_for("cuda")


def test_random_streams_continue_exactly_on_the_same_device():
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(5)
    saved = rng_state(cpu, generator)
    expected = torch.rand(4, generator=generator), torch.rand(4)
    other = torch.Generator().manual_seed(99)
    torch.manual_seed(99)
    assert restore_rng(saved, cpu, other, reseed=7)
    assert torch.equal(torch.rand(4, generator=other), expected[0]) and torch.equal(torch.rand(4), expected[1])


def test_a_checkpoint_written_on_gpus_resumes_on_a_cpu_with_fresh_streams():
    """A CUDA generator's state is 16 bytes, a CPU one's 5,056: restoring one into the other raised."""
    cpu = torch.device("cpu")
    from_gpu = {
        "device": "cuda",
        "cpu": torch.get_rng_state(),
        "cuda": torch.zeros(16, dtype=torch.uint8),
        "generator": torch.zeros(16, dtype=torch.uint8),
    }
    generator = torch.Generator()
    assert not restore_rng(from_gpu, cpu, generator, reseed=11)  # goes on, not bit for bit
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(11)))


def test_checkpoints_written_before_the_device_was_recorded_still_resume():
    cpu, generator_state = torch.device("cpu"), torch.Generator().manual_seed(4).get_state()
    [from_ldm] = saved_streams({"rng": [generator_state], "torch_rng": [torch.get_rng_state()]})  # train_ldm's old keys
    generator = torch.Generator()
    assert from_ldm["device"] == "cpu" and restore_rng(from_ldm, cpu, generator, reseed=0)
    assert torch.equal(generator.get_state(), generator_state)
    [from_autoencoder] = saved_streams(
        {"torch_rng": [torch.get_rng_state()], "cuda_rng": [torch.zeros(16, dtype=torch.uint8)]}
    )
    assert from_autoencoder["device"] == "cuda" and from_autoencoder["generator"] is None
    assert restore_rng(from_autoencoder, cpu, None, reseed=0)  # only torch's CPU stream to continue on a CPU


def test_cuda_random_state_is_saved_and_restored_on_a_gpu(gpu, monkeypatch):
    """Dropout on a GPU draws from CUDA's own stream: a checkpoint must carry it (16 bytes: seed and offset)."""
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    cuda_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: restored.append(seed))
    saved = rng_state(CUDA)
    assert saved["device"] == "cuda" and torch.equal(saved["cuda"], cuda_state)
    assert restore_rng(saved, CUDA, None, reseed=1) and torch.equal(restored.pop(), cuda_state)
    from_cpu = rng_state(torch.device("cpu"))  # a CPU run resumed on a GPU: CUDA's stream starts from the seed
    assert not restore_rng(from_cpu, CUDA, None, reseed=1) and restored.pop() == 1


def test_optimizer_state_lands_on_the_device_its_parameters_train_on():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    # The old order: state loaded while the model was still on the CPU, the model moved afterwards.
    with pytest.raises(
        RuntimeError, match=r"the optimizer's parameters are on \['cpu'\], training runs on meta: move the model"
    ):
        restore_optimizer(torch.optim.Adam(torch.nn.Linear(4, 2).parameters()), saved, torch.device("meta"))
    moved = torch.nn.Linear(4, 2).to("meta")
    resumed = torch.optim.Adam(moved.parameters())
    restore_optimizer(resumed, saved, torch.device("meta"))
    moments = [v for state in resumed.state.values() for k, v in state.items() if k != "step"]
    assert moments and all(m.device.type == "meta" for m in moments)


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")  # meta tensors hold no values to load
def test_a_resumed_autoencoder_trains_with_its_optimizer_state_on_its_device():
    """train_autoencoder's parts as its loop builds them, resumed onto the ``meta`` device (a GPU's stand-in)."""
    settings = OmegaConf.to_object(compose("stage=train_autoencoder").stage)
    parts = training_parts(settings, tiny_autoencoder("kl"), None, torch.device("cpu"), {})
    for optimizer in (parts.ae_optimizer, parts.d_optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
    parts = training_parts(settings, tiny_autoencoder("kl"), None, torch.device("meta"), parts.state_dict())
    assert parts.autoencoder.device.type == "meta" and all(p.device.type == "meta" for p in parts.loss.parameters())
    for optimizer in (parts.ae_optimizer, parts.d_optimizer):
        moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
        assert moments and all(m.device.type == "meta" for m in moments)


def tiny_autoencoder(kind: str) -> AutoencoderKL | VQModel:
    common = dict(
        block_out_channels=(16, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
    )
    torch.manual_seed(0)
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=8192, vq_embed_dim=4)
    return AutoencoderKL(**common)


def test_vq_codes_are_chosen_in_fp32_when_the_encoder_runs_in_bf16():
    model = tiny_autoencoder("vq")
    with torch.no_grad():  # a trained codebook's spread, not its initial ±1/8192
        model.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(0))
    model = for_inference(model, torch.device("cpu"), torch.bfloat16)
    pixels = torch.randint(
        0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    ).numpy()
    [latent] = encode_pixels(model, pixels, "cpu", torch.bfloat16).values()
    with torch.no_grad():
        h = model.encode(torch.from_numpy(normalise(pixels)).bfloat16()).latents.float()
    codebook = model.quantize.embedding.weight.detach()
    assert codebook.dtype == torch.float32
    vectors = h.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(vectors, codebook).argmin(1)
    expected = codebook[nearest].reshape(8, 16, 16, 4).permute(0, 3, 1, 2).half()
    assert torch.equal(torch.from_numpy(latent), expected)
    in_bf16 = torch.cdist(vectors.bfloat16(), codebook.bfloat16()).argmin(1)  # what casting the codebook too chose
    assert (in_bf16 != nearest).float().mean() > 0.01


def test_models_saved_in_half_precision_load_in_fp32(tmp_path):
    """transformers 5 keeps a checkpoint's dtype: an fp16 text encoder's features then met the fp32 UNet."""
    bert = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    bert.half().save_pretrained(tmp_path / "bert")
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    clip.half().save_pretrained(tmp_path / "clip" / "text_encoder")
    tiny_autoencoder("kl").half().save_pretrained(tmp_path / "vae")
    for text_encoder in (
        load_text_encoder(str(tmp_path / "bert")),
        load_text_encoder(str(tmp_path / "clip"), subfolder="text_encoder"),
    ):
        assert encode_text(text_encoder, torch.tensor([[1, 2, 3]])).dtype == torch.float32
    assert load_first_stage(str(tmp_path / "vae")).dtype == torch.float32


def test_cpu_encoder_actors_stay_on_the_cpu_of_a_gpu_host(gpu, tmp_path):
    """Ray does not hide a GPU host's GPUs from an actor that asked for none."""
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    tiny_autoencoder("kl").save_pretrained(tmp_path / "vae")
    assert encoder_device(0) == "cpu" and encoder_device(1) == encoder_device(0.5) == "cuda"
    encoder = Encoder(
        str(tmp_path / "vae"),
        None,
        Storage(root=str(tmp_path)),
        encoder_device(0),
        "bfloat16",
        1,
        32,
        release_every=0,
        text_encoder=None,
        text_encoder_subfolder=None,
    )
    assert encoder.device.type == "cpu" and encoder.dtype == torch.float32 and encoder.model.device.type == "cpu"


def test_the_served_model_runs_on_the_servers_gpu(gpu):
    from pipelines.stages.export.pyfunc_model import serving_device

    assert serving_device(None) == "cpu"
    gpu("NVIDIA L4", (8, 9))
    assert (
        serving_device(None) == serving_device({"device": "auto"}) == "cuda"
        and serving_device({"device": "cpu"}) == "cpu"
    )


@pytest.mark.parametrize("gpus", ["0.5", "2"])
def test_a_ddp_worker_takes_exactly_one_whole_gpu(tmp_path, gpus):
    for stage in ("train_ldm", "train_autoencoder"):
        with pytest.raises(
            ValueError, match=rf"stage.scaling.gpus_per_worker={gpus} with stage.scaling.use_gpu=true: expected 1"
        ):
            stages.load(stage).run(
                compose(
                    f"stage={stage}",
                    f"storage.root={tmp_path}",
                    "stage.scaling.use_gpu=true",
                    f"stage.scaling.gpus_per_worker={gpus}",
                )
            )


def test_a_plan_the_local_cluster_can_never_place_is_refused_at_once(ray_cluster, tmp_path):
    """Ray would wait for it forever, without a word."""
    with pytest.raises(
        ValueError,
        match=r"^stage.resources.num_cpus_per_task: 1 x 6 CPU at once: 6 CPU, the local cluster has 4 "
        r"\(cluster.num_cpus\)$",
    ):
        stages.load("synthesize").run(
            compose(
                "stage=synthesize",
                "experiment=ci",
                f"storage.root={tmp_path}/store",
                f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
                "stage.resources.num_cpus_per_task=6",
            )
        )
