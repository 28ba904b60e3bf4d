"""A frozen pretrained text encoder end to end: prepare with its tokenizer (from a subfolder), encode_latents
writing its τθ(y) beside the latents, train_ldm on them without ever running it, and an export that plain
diffusers loads and that draws what stage=sample drew. Tiny random-init models saved by the test, as their hubs
ship them (a whole CLIP model in text_encoder/, T5 with its decoder); nothing is downloaded."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import in_fresh_process
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

from ldm.latents import TEXT_EMBEDDING, column_array
from ldm.models.first_stage import build_first_stage
from ldm.models.presets import first_stage_preset
from ldm.models.text_to_image import encode_text, load_text_encoder
from ldm.synthetic.scene import all_scenes, caption
from ldm.text.tokenizer import train_wordpiece
from pipelines import stages
from pipelines.driver.config import compose

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

PROMPT = "a red circle in the top left on a blue background"
WIDTH = 32


def clip_tokenizer(captions: list[str]) -> CLIPTokenizer:
    """CLIP's kind: byte-level BPE whose word-final pieces end in </w>, between <|startoftext|> and <|endoftext|>."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        captions,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|startoftext|>", "<|endoftext|>"],
            end_of_word_suffix="</w>",
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    model = json.loads(bpe.to_str())["model"]
    return CLIPTokenizer(
        vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    )


def t5_tokenizer(captions: list[str]) -> T5Tokenizer:
    """T5's kind: a SentencePiece unigram model (▁ marks a word's start), </s> at the end, no start token."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(
        captions, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    )
    return T5Tokenizer(vocab=[tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]], extra_ids=0)


def save_encoders(root):
    """Each encoder's repository as its hub ships it, with its own kind of tokenizer in tokenizer/: (location,
    its encoder's subfolder)."""
    captions = [caption(s, t) for s in all_scenes() for t in range(3)]
    tokenizers = {
        "clip": clip_tokenizer(captions),
        "t5": t5_tokenizer(captions),
        "bert": train_wordpiece(captions, vocab_size=200, max_length=77),
    }
    layers = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vocab = {name: len(tokenizer) for name, tokenizer in tokenizers.items()}
    torch.manual_seed(0)
    models = {
        "clip": (
            CLIPModel(
                CLIPConfig(
                    text_config={
                        **layers,
                        "vocab_size": vocab["clip"],
                        "max_position_embeddings": 77,
                        "bos_token_id": 0,
                        "eos_token_id": 1,
                        "pad_token_id": 1,
                    },
                    vision_config={**layers, "image_size": 16, "patch_size": 8},
                )
            ),
            "text_encoder",
        ),
        "t5": (
            T5ForConditionalGeneration(
                T5Config(vocab_size=vocab["t5"], d_model=WIDTH, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
            ),
            None,
        ),
        "bert": (BertModel(BertConfig(vocab_size=vocab["bert"], max_position_embeddings=77, **layers)), None),
    }
    for name, (model, subfolder) in models.items():
        model.save_pretrained(root / name / (subfolder or ""))
        tokenizers[name].save_pretrained(root / name / "tokenizer")
    return {name: (str(root / name), subfolder) for name, (_, subfolder) in models.items()}


@pytest.fixture(scope="module")
def corpus(ray_cluster, tmp_path_factory):
    """The synthetic images, the three encoders' repositories and a first stage."""
    root = tmp_path_factory.mktemp("frozen")
    common = ["experiment=ci", f"storage.root={root}/store", f"tracking.uri=sqlite:///{root}/mlruns.db"]
    encoders = save_encoders(root)
    stages.load("synthesize").run(compose("stage=synthesize", *common))
    build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(root / "first_stage")
    return root, common, encoders


def sub(key: str, subfolder: str | None) -> list[str]:
    return [f"{key}={subfolder}"] if subfolder else []


@pytest.mark.parametrize("name", ["clip", "t5", "bert"])
def test_trained_on_precomputed_embeddings_it_exports_a_pipeline_that_draws_the_same(corpus, name, tmp_path):
    root, common, encoders = corpus
    location, subfolder = encoders[name]
    # Prepared with this encoder's tokenizer, from the shared synthetic images; its outputs under tmp_path.
    common = [*common, f"storage.root={tmp_path}/store", f"data.raw_url={root}/store/raw"]
    stages.load("prepare").run(
        compose(
            "stage=prepare",
            *common,
            "stage.tokenizer.train=false",
            f"stage.tokenizer.name_or_path={location}",
            "stage.tokenizer.subfolder=tokenizer",
        )
    )
    encoded = stages.load("encode_latents").run(
        compose(
            "stage=encode_latents",
            *common,
            f"stage.first_stage={root}/first_stage",
            f"stage.text_encoder={location}",
            *sub("stage.text_encoder_subfolder", subfolder),
        )
    )
    made_by = encoded["facts"]["text_encoder"]
    assert (
        made_by["width"] == WIDTH
        and made_by["class"] == {"clip": "CLIPTextModel", "t5": "T5EncoderModel", "bert": "BertModel"}[name]
    )

    # Each row's embedding is the encoder's output on its tokens, stored as float16.
    shard = pq.read_table(sorted((tmp_path / "store" / "latents" / "shards").glob("*.parquet"))[0])
    encoder = load_text_encoder(location, subfolder=subfolder).eval()
    ids = torch.tensor(np.stack(shard["input_ids"].to_numpy(zero_copy_only=False)[:4])).long()
    with torch.no_grad():
        expected = encode_text(encoder, ids).numpy()
    stored = column_array(shard[TEXT_EMBEDDING])[:4]
    assert stored.dtype == np.float16 and stored.shape == (4, 77, WIDTH)
    assert np.allclose(stored.astype(np.float32), expected, atol=2e-3)

    # One worker (two are tested elsewhere); the validation grid, for which rank 0 loads the encoder, once.
    grid = [] if name == "clip" else ["stage.validation.prompts=[]"]
    train = [
        "stage=train_ldm",
        *common,
        "stage.steps=4",
        "stage.log_every=2",
        "stage.sample_every=4",
        "stage.scaling.num_workers=1",
        *grid,
        f"stage.model.pretrained_text_encoder={location}",
        *sub("stage.model.pretrained_text_encoder_subfolder", subfolder),
    ]
    trained = stages.load("train_ldm").run(compose(*train))
    assert trained["facts"]["text_embeddings_precomputed"] and not trained["facts"]["text_encoder_trained"]

    sampled = tmp_path / "samples"
    stages.load("sample").run(
        compose(
            "stage=sample",
            *common,
            f"stage.prompts={json.dumps([PROMPT])}",
            "stage.batch_size=1",
            f"stage.output_url={sampled}",
        )
    )
    export = stages.load("export").run(
        compose("stage=export", *common, f"stage.output_url={tmp_path}/export", "stage.log_model=false")
    )
    assert export["facts"]["pipeline"] == "LDMTextToImagePipeline"
    script = (
        "import sys, torch; from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "size = 8 * pipe.unet.config.sample_size\n"
        "image = pipe([sys.argv[2]], height=size, width=size, num_inference_steps=4, guidance_scale=4.0,"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "image.save(sys.argv[3]); print(type(pipe.bert).__name__)\n"
    )
    loaded = in_fresh_process(script, tmp_path / "export", PROMPT, tmp_path / "diffusers.png", cwd=tmp_path)
    assert loaded.split()[-1] == made_by["class"]
    drawn = np.asarray(Image.open(tmp_path / "diffusers.png").convert("RGB")).astype(int)
    assert (
        np.abs(drawn - np.asarray(Image.open(sampled / "images" / "00000.png").convert("RGB")).astype(int)).max() <= 2
    )

    # Latents embedded by one encoder are refused to a run that names another.
    other = "clip" if name == "bert" else "bert"
    with pytest.raises(ValueError, match=f"made by {location}.*pretrained_text_encoder={encoders[other][0]}"):
        stages.load("train_ldm").run(
            compose(
                *train[: -1 - bool(subfolder)],
                f"stage.model.pretrained_text_encoder={encoders[other][0]}",
                *sub("stage.model.pretrained_text_encoder_subfolder", encoders[other][1]),
            )
        )
