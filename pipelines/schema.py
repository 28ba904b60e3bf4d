"""The typed config tree: one dataclass per node of ``conf/``, registered with Hydra's ConfigStore by
``pipelines.driver.config`` and named first in each option's defaults list, so Hydra checks every value at compose
time: a wrong type, an unknown choice or an unknown key is Hydra's error naming the key, before anything runs.

The values (every default) live in ``conf/``; these classes hold the types only. Choices are enums of the
names the library takes (``ldm.choices``, ``ldm.models.presets``), so a new sampler or preset is one edit
there. Ray Train workers get their stage's node as an instance of its class (``OmegaConf.to_object``): this
module imports neither Hydra nor OmegaConf, so worker processes can load it.

What a setting is to the outputs it makes is declared on its field (``operational()``, ``run_extent()``); a setting
that declares nothing is content: part of its output's fingerprint and of a training run's identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Dict, List, Optional

from ldm.choices import ATTENTION, LR_SCHEDULES, NOISE_SCHEDULES, PRECISIONS, PREDICTION_TYPES, SAMPLERS, WEIGHTS
from ldm.models.presets import FIRST_STAGE_PRESETS, TEXT_ENCODER_KINDS, TEXT_TO_IMAGE_PRESETS


class Choice(str, Enum):
    """A config choice: a member is its name, compares equal to it, and prints as it."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


def _choice(name: str, values) -> type[Choice]:
    # The functional form: names such as "dpm++" or "tiny-kl-f4" are not identifiers.
    return Choice(name, {v: v for v in values}, module=__name__, qualname=name)


Sampler = _choice("Sampler", SAMPLERS)
NoiseSchedule = _choice("NoiseSchedule", NOISE_SCHEDULES)
PredictionType = _choice("PredictionType", PREDICTION_TYPES)
Attention = _choice("Attention", ATTENTION)
Precision = _choice("Precision", PRECISIONS)
Weights = _choice("Weights", WEIGHTS)
LrSchedule = _choice("LrSchedule", LR_SCHEDULES)
FirstStagePresetName = _choice("FirstStagePresetName", FIRST_STAGE_PRESETS)
TextToImagePresetName = _choice("TextToImagePresetName", TEXT_TO_IMAGE_PRESETS)
TextEncoderKind = _choice("TextEncoderKind", TEXT_ENCODER_KINDS)
InputFormat = _choice("InputFormat", ("metadata", "parquet", "webdataset"))  # what stage=prepare reads
ShardFormat = _choice("ShardFormat", ("webdataset", "parquet"))  # img2dataset output formats prepare reads back
Device = _choice("Device", ("auto", "cpu", "cuda"))  # auto: a GPU if there is one
Placement = _choice("Placement", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))  # Ray placement strategies
Dtype = _choice("Dtype", ("bfloat16", "float16", "float32"))
ResizeMode = _choice("ResizeMode", ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"))  # img2dataset's
EncodeFormat = _choice("EncodeFormat", ("jpg", "png", "webp"))
Compression = _choice("Compression", ("zstd", "snappy", "gzip", "brotli", "lz4", "none"))  # parquet codecs


# -- what a setting is to the outputs it makes ---------------------------------------------------------------------
ROLE = "role"  # the dataclass field metadata key
CONTENT = "content"
OPERATIONAL = "operational"
RUN_EXTENT = "run_extent"


def operational() -> Any:
    """A setting of how fast an output is made, or how it is logged and watched, never of what it holds: left out of
    every fingerprint, so that changing it finds the outputs complete."""
    return field(metadata={ROLE: OPERATIONAL})


def run_extent() -> Any:
    """How far a training run goes, where it writes, on what hardware and whether it resumes (for a task: where its
    outputs go): in the output's fingerprint but not in the run's (or the task's) identity, so that a re-run with
    more steps, other cadences or other workers' CPUs continues the same run."""
    return field(metadata={ROLE: RUN_EXTENT})


def roles(schema: type) -> dict[str, str]:
    """Each setting of a schema class and its declared role."""
    return {f.name: f.metadata.get(ROLE, CONTENT) for f in fields(schema)}


# -- data ---------------------------------------------------------------------------------------------------------
@dataclass
class Input:
    """What stage=prepare reads; a column set to null means the data has none (its rule is skipped)."""

    url: str
    format: InputFormat
    url_col: Optional[str]
    caption_col: str
    similarity_col: Optional[str]
    nsfw_col: Optional[str]
    width_col: Optional[str]
    height_col: Optional[str]
    status_col: Optional[str]
    sha256_col: Optional[str]
    key_col: Optional[str]
    image_col: Optional[str]
    label_col: Optional[str]  # the image's class, for class-conditional models
    boxes_col: Optional[str]  # its layout (JSON boxes), for layout-to-image models
    optional: List[str]  # roles whose column may be absent from the data: their rule is then skipped


@dataclass
class MetadataInput(Input):
    extra_columns: List[str]  # carried into the download by img2dataset --save_additional_columns


@dataclass
class Data:
    name: str
    scenes: bool
    resolution: int
    input: Input
    prepared_url: str


@dataclass
class ImageData(Data):
    validation_prompts: List[str] = operational()


@dataclass
class MetadataData(ImageData):
    input: MetadataInput
    images_url: str  # where stage=download writes the images
    images_prepared_url: str  # where stage=pipeline prepares them (stage=prepare on images_url)


@dataclass
class SyntheticData(ImageData):
    raw_url: str
    image_host: str
    num_samples: int
    seed: int
    holdout_fraction: float
    bad_rows: Dict[str, float]


@dataclass
class SyntheticMetadataData(SyntheticData):
    input: MetadataInput
    images_url: str
    images_prepared_url: str


# -- where outputs go, where runs are tracked, which Ray ---------------------------------------------------------
@dataclass
class StorageConfig:
    root: str
    endpoint_url: Optional[str]
    region: Optional[str]
    shared: bool


@dataclass
class S3StorageConfig(StorageConfig):
    bucket: str
    prefix: str


@dataclass
class Tracking:
    uri: str
    experiment: str


@dataclass
class Cluster:
    address: str
    num_cpus: Optional[float]
    num_gpus: Optional[float]
    object_store_memory: Optional[int]
    include_dashboard: Optional[bool]


# -- shared by stages ---------------------------------------------------------------------------------------------
@dataclass
class Scaling:
    """A Ray Train worker group."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    placement_strategy: Placement
    max_failures: int


# -- stage=synthesize ---------------------------------------------------------------------------------------------
@dataclass
class SynthesizeResources:
    num_cpus_per_task: float


@dataclass
class Synthesize:
    name: str
    rows_per_shard: int
    metadata_rows_per_file: int
    formats: List[ShardFormat]
    jpeg_quality: int
    resources: SynthesizeResources = operational()


# -- stage=prepare ------------------------------------------------------------------------------------------------
@dataclass
class Filters:
    status: Optional[str]
    min_similarity: Optional[float]
    nsfw_allowed: Optional[List[str]]
    min_width: Optional[int]
    min_height: Optional[int]
    max_aspect_ratio: Optional[float]
    caption_min_chars: Optional[int]
    caption_max_chars: Optional[int]
    caption_min_tokens: Optional[int]
    caption_max_tokens: Optional[int]
    caption_denylist: Optional[List[str]]
    dedup_urls: bool
    dedup_images: bool
    verify_image_stream: bool


@dataclass
class TokenizerConfig:
    train: bool
    name_or_path: str
    subfolder: Optional[str]
    vocab_size: int
    min_frequency: int
    lowercase: bool
    train_max_captions: int
    max_length: int


@dataclass
class Img2dataset:
    output_format: ShardFormat
    processes_count: int
    thread_count: int
    number_sample_per_shard: int


@dataclass
class PrepareResources:
    num_cpus_per_task: float
    batch_rows: int
    dedup_on_driver_max_rows: int
    dedup_partitions: int


@dataclass
class HeldOut:
    fraction: float
    salt: str


@dataclass
class Prepare:
    name: str
    filters: Filters
    tokenizer: TokenizerConfig
    max_rows_per_file: int
    max_bytes_per_file: int
    rows_per_task: int
    held_out: HeldOut
    img2dataset: Img2dataset
    resources: PrepareResources = operational()


# -- stage=download -----------------------------------------------------------------------------------------------
@dataclass
class DownloadResources:
    thread_count: int
    num_cpus_per_task: float
    max_shards_at_once: Optional[int]


@dataclass
class Download:
    name: str
    output_format: ShardFormat
    number_sample_per_shard: int
    timeout: float
    retries: int
    resize_mode: ResizeMode
    image_size: int
    resize_only_if_bigger: bool
    encode_format: EncodeFormat
    encode_quality: int
    min_image_size: Optional[int]
    max_aspect_ratio: Optional[float]
    user_agent_token: Optional[str]
    disallowed_header_directives: List[str]
    resources: DownloadResources = operational()


# -- stage=train_autoencoder --------------------------------------------------------------------------------------
@dataclass
class FirstStageFields:
    """Fields of the first-stage preset to replace (``ldm.models.presets.FirstStagePreset``); null keeps the
    preset's."""

    block_out_channels: Optional[List[int]]
    layers_per_block: Optional[int]
    attention_levels: Optional[List[int]]
    num_vq_embeddings: Optional[int]
    norm_num_groups: Optional[int]


@dataclass
class AutoencoderModel:
    preset: FirstStagePresetName
    overrides: FirstStageFields
    latent_channels: Optional[int]  # null: the preset's
    logvar_bias: Optional[float]


@dataclass
class AutoencoderLoss:
    kl_weight: float
    codebook_weight: float
    disc_weight: float
    disc_start: int
    perceptual_weight: float
    foreground_weight: float
    mse_weight: float


@dataclass
class AutoencoderOptimizer:
    lr: float
    disc_lr: float
    betas: List[float]
    schedule: LrSchedule
    warmup_steps: int
    final_ratio: float


@dataclass
class DecodeResources:
    num_cpus_per_decode_task: float


@dataclass
class TrainAutoencoder:
    name: str
    model: AutoencoderModel
    pretrained: Optional[str]
    loss: AutoencoderLoss
    disc_layers: int
    lpips_weights: List[str]
    optimizer: AutoencoderOptimizer
    steps: int = run_extent()
    batch_size: int
    seed: int
    random_flip: bool
    crop: Optional[int]
    shuffle_buffer: int
    validation_images: int = operational()
    scene_fidelity: bool
    log_every: int = operational()
    eval_every: int = operational()
    checkpoint_every: int = operational()
    keep_checkpoints: int = operational()
    precision: Precision
    scaling: Scaling = run_extent()
    output_url: str = run_extent()
    checkpoints_url: str = run_extent()
    resources: DecodeResources = operational()


# -- stage=encode_latents -----------------------------------------------------------------------------------------
@dataclass
class EncodeResources:
    num_cpus_per_decode_task: float
    decode_batch_size: int
    # Ray node labels ({label: value}) or null: any node. Any, not Optional[Dict]: OmegaConf 2.3 cannot merge a
    # command-line mapping into a null Dict node.
    decode_label_selector: Any
    encoder_concurrency: int
    encoder_batch_size: int
    num_cpus_per_encoder: float
    num_gpus_per_encoder: float
    encoder_label_selector: Any
    dtype: Dtype
    release_memory_every: int
    num_cpus_per_write_task: float
    block_mb: float


@dataclass
class EncodeLatents:
    name: str
    first_stage: str
    first_stage_subfolder: Optional[str]
    text_encoder: Optional[str]
    text_encoder_subfolder: Optional[str]
    resolution: int
    output_url: str
    compression: Compression
    row_group_rows: int
    held_out_images: int
    resources: EncodeResources = operational()


# -- stage=train_ldm ----------------------------------------------------------------------------------------------
@dataclass
class UNetFields:
    """Fields of the preset's UNet to replace (``ldm.models.presets.UNetSpec``); null keeps the preset's."""

    block_out_channels: Optional[List[int]]
    layers_per_block: Optional[int]
    attention_levels: Optional[List[int]]
    heads: Optional[int]
    self_attention_levels: Optional[List[int]]


@dataclass
class TextEncoderFields:
    """Fields of the preset's τθ to replace (``ldm.models.presets.TextEncoderSpec``); null keeps the preset's."""

    layers: Optional[int]
    width: Optional[int]
    heads: Optional[int]
    ffn: Optional[int]
    kind: Optional[TextEncoderKind]


@dataclass
class LdmModel:
    preset: TextToImagePresetName
    unet: UNetFields
    text_encoder: TextEncoderFields
    pretrained_text_encoder: Optional[str]
    pretrained_text_encoder_subfolder: Optional[str]


@dataclass
class Noise:
    schedule: NoiseSchedule
    timesteps: int
    beta_start: float
    beta_end: float
    prediction_type: PredictionType
    zero_terminal_snr: bool
    snr_gamma: Optional[float]


@dataclass
class LdmOptimizer:
    lr: float
    betas: List[float]
    weight_decay: float
    schedule: LrSchedule
    warmup_steps: int
    final_ratio: float
    grad_clip: float
    accumulation: int


@dataclass
class Ema:
    decay: float
    start_step: int


@dataclass
class Validation:
    prompts: List[str]
    images: int
    sampler: Sampler
    steps: int
    guidance_scale: float
    seed: int


@dataclass
class TrainLdm:
    name: str
    latents_url: str
    model: LdmModel
    noise: Noise
    caption_dropout: float
    optimizer: LdmOptimizer
    ema: Ema
    steps: int = run_extent()
    batch_size: int
    seed: int
    shuffle_buffer: int
    prefetch_batches: int = operational()
    precision: Precision
    attention: Attention
    gradient_checkpointing: bool
    compile: bool
    data_audit: bool = operational()
    log_every: int = operational()
    validation_images: int = operational()
    eval_every: int = operational()
    checkpoint_every: int = operational()
    keep_checkpoints: int = operational()
    sample_every: int = operational()
    validation: Validation = operational()
    resume: str = run_extent()
    scaling: Scaling = run_extent()
    log_model: bool = operational()
    output_url: str = run_extent()
    checkpoints_url: str = run_extent()


# -- stage=sample, stage=evaluate, stage=export: a train_ldm output in -----------------------------------------------
@dataclass
class ModelStage:
    name: str
    model_url: str
    weights: Weights
    sampler: Sampler
    output_url: str


@dataclass
class Generation(ModelStage):
    """A model stage that draws images."""

    steps: int
    guidance_scale: float
    seed: int
    batch_size: int
    device: Device


@dataclass
class Sample(Generation):
    prompts: List[str]
    prompts_file: Optional[str]
    images_per_prompt: int
    num_images: int  # a model without prompts draws this many (unconditional; its own layouts; held-out images)
    classes: List[str]  # what a class-conditional model draws (empty: every class it knows)
    # What a layout-to-image model draws: lists of boxes, or their JSON text (empty: num_images of its own).
    layouts: List[Any]
    images: List[str]  # image files to upsample or fill (super_resolution, inpainting; empty: held-out images)
    masks: List[str]  # inpainting: a mask file per image in `images`, light in the hole (empty: random holes)
    grid_columns: int


@dataclass
class Reconstruction:
    enabled: bool
    images: int
    scene_fidelity: bool


@dataclass
class Adherence:
    enabled: bool
    synthesized_url: Optional[str]
    prompts: int
    seeds: int


@dataclass
class Fid:
    feature_extractor: Optional[str]
    images: int
    kid_subset_size: int


@dataclass
class Scenes:
    enabled: bool
    images: int


@dataclass
class Classes:
    enabled: bool
    images_per_class: int


@dataclass
class Evaluate(Generation):
    reconstruction: Reconstruction
    adherence: Adherence
    scenes: Scenes
    classes: Classes
    layouts: Scenes  # the same two settings: enabled, images
    restoration: Scenes
    fid: Fid


@dataclass
class Export(ModelStage):
    registered_model: Optional[str]
    log_model: bool = operational()


# -- stage=pipeline -----------------------------------------------------------------------------------------------
@dataclass
class Pipeline:
    name: str
    synthesize: Synthesize
    prepare: Prepare
    download: Download
    train_autoencoder: TrainAutoencoder
    encode_latents: EncodeLatents
    train_ldm: TrainLdm
    sample: Sample
    evaluate: Evaluate
    export: Export


# -- task: what the latent diffusion model is conditioned on (ldm.tasks) ---------------------------------------------
@dataclass
class TaskConfig:
    """A task's settings. Its identity (``pipelines.driver.stage.task_identity``) is its name and the settings that
    change its model; the ``run_extent`` ones say where its outputs go and which first stage it reads."""

    name: str
    suffix: str = run_extent()  # appended to the default output folders of the stages the task changes
    # Appended to encode_latents' default output: only the tasks that concatenate an image to z_t have their own.
    latents_suffix: str = run_extent()
    # The first stage's latent channels the task needs (null: the preset's); that first stage's own fingerprint
    # carries them into every output made from it.
    latent_channels: Optional[int] = run_extent()
    # Appended to train_autoencoder's default output: a task that needs another first stage has its own.
    autoencoder_suffix: str = run_extent()


@dataclass
class LayoutTaskConfig(TaskConfig):
    max_objects: int  # boxes per layout that τθ reads (3 tokens each); a layout with more keeps its largest
    grid: int  # box corners are discretised to grid x grid cells


# -- the root -----------------------------------------------------------------------------------------------------
@dataclass
class Config:
    stage: Any  # the chosen stage's class
    data: Any  # the chosen data option's class
    task: TaskConfig
    storage: Any
    tracking: Tracking
    cluster: Cluster
    overwrite: bool  # replace a complete output of a different config at the same location


# Which class each config option is checked against: ConfigStore entries schema/<group>/<option>.
OPTIONS: dict[str, dict[str, type]] = {
    "stage": {
        "synthesize": Synthesize,
        "prepare": Prepare,
        "download": Download,
        "train_autoencoder": TrainAutoencoder,
        "encode_latents": EncodeLatents,
        "train_ldm": TrainLdm,
        "sample": Sample,
        "evaluate": Evaluate,
        "export": Export,
        "pipeline": Pipeline,
    },
    "data": {
        "synthetic": SyntheticData,
        "synthetic_metadata": SyntheticMetadataData,
        "laion400m": ImageData,
        "laion400m_metadata": MetadataData,
        "url_list": MetadataData,
        "webdataset": ImageData,
        "image_parquet": ImageData,
    },
    "storage": {"local": StorageConfig, "s3": S3StorageConfig},
    "tracking": {"local": Tracking, "server": Tracking},
    "cluster": {"local": Cluster, "remote": Cluster},
    "task": {
        "text_to_image": TaskConfig,
        "unconditional": TaskConfig,
        "class_conditional": TaskConfig,
        "layout_to_image": LayoutTaskConfig,
        "super_resolution": TaskConfig,
        "inpainting": TaskConfig,
    },
}
