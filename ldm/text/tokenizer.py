"""The caption tokenizer: a pretrained BERT-style tokenizer, or a WordPiece one trained on our captions.

Either way it is a ``transformers`` tokenizer saved with ``save_pretrained`` into the prepare stage's output,
and every later stage loads that copy: the ids in the prepared shards and the ids a sampler produces from a
prompt then always come from the same vocabulary.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from ldm.storage import Storage, pretrained_directory

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def train_wordpiece(
    captions: Iterable[str], vocab_size: int, max_length: int, lowercase: bool = True, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer (BERT's normaliser, pre-tokenizer, [CLS] ... [SEP] template) trained on
    ``captions``; ``vocab_size`` is an upper bound: a small corpus yields fewer entries."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS.values())
    )
    tokenizer.train_from_iterator(captions, trainer)
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    return BertTokenizer(
        tokenizer_object=tokenizer, model_max_length=max_length, do_lower_case=lowercase, **SPECIAL_TOKENS
    )


def load_tokenizer(
    name_or_path: str, storage: Storage | None = None, subfolder: str | None = None
) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id, a local directory, or an ``s3://`` directory (fetched to a local cache),
    optionally in a ``subfolder`` (a diffusers repository's ``tokenizer/``).

    Hub ids and local directories take the same ``AutoTokenizer.from_pretrained`` path; only object-store
    locations are copied to local disk first, because ``from_pretrained`` reads files.
    """
    with pretrained_directory(name_or_path, storage) as local:
        folder = os.path.join(local, subfolder or "")
        if os.path.isdir(local) and not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
            where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
            raise FileNotFoundError(f"{where} holds no tokenizer (no tokenizer_config.json)")
        return AutoTokenizer.from_pretrained(local, subfolder=subfolder or "")


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, storage: Storage, url: str) -> list[str]:
    """``save_pretrained`` into ``url`` (local or object store); returns the file names written."""
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as local:
        tokenizer.save_pretrained(local)
        names = sorted(os.listdir(local))
        fs, path = storage.fsspec(url)
        fs.makedirs(path, exist_ok=True)
        # tokenizer_config.json last: loaders treat a directory without it as no tokenizer.
        for name in sorted(names, key=lambda n: n == "tokenizer_config.json"):
            fs.put_file(os.path.join(local, name), f"{path}/{name}")
    return names


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32, attention_mask int8), both ``len(captions) x max_length``: padded and truncated the
    way the LDM text encoder and diffusers' ``LDMTextToImagePipeline`` tokenize prompts."""
    encoded = tokenizer(captions, max_length=max_length, padding="max_length", truncation=True, return_tensors="np")
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int8)


def token_counts(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> np.ndarray:
    """Tokens per caption, special tokens included, before truncation."""
    if not captions:
        return np.zeros(0, dtype=np.int64)
    encoded = tokenizer(captions, add_special_tokens=True, truncation=False, verbose=False)  # long ones are the point
    return np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(captions))
