"""The encoder actor of stage=encode_latents: it holds the first stage on its device (GPU or CPU)."""

from __future__ import annotations

import ctypes

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ldm.devices import device_for, enable_tf32
from ldm.latents import MASK, MASKED_LATENT, TEXT_EMBEDDING, column_array, latent_columns, tensor_column
from ldm.models.first_stage import encode_pixels, factor, for_inference, kind, load_first_stage
from ldm.models.image_conditioned import image_tensor, latent_mask, masked_latent
from ldm.models.text_to_image import encode_text, load_text_encoder
from ldm.storage import Storage

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
    _malloc_trim = None


def encoder_device(num_gpus: float) -> str:
    """The device of an actor that asked Ray for ``num_gpus``: the GPU Ray gave it (Ray makes it the actor's only
    visible one, cuda:0), or the CPU. Never ``torch.cuda.is_available()``: Ray does not hide a GPU host's GPUs from
    an actor that asked for none, and such actors would all pile onto cuda:0 beside the training workers."""
    return "cuda" if num_gpus > 0 else "cpu"


class Encoder:
    """An actor holding the first stage (and the frozen text encoder, when one is named) on ``device``, in
    ``dtype`` there when it is a GPU (fp32 on a CPU)."""

    def __init__(
        self,
        first_stage: str,
        subfolder: str | None,
        storage: Storage,
        device: str,
        dtype: str,
        threads: int,
        resolution: int,
        release_every: int,
        text_encoder: str | None,
        text_encoder_subfolder: str | None,
        concat: str | None = None,
    ):
        # glibc keeps the pages of freed activations, ever more fragmented, so the actor would grow with the data
        # encoded: every release_every batches (stage.resources.release_memory_every) they go back to the OS.
        self.release_every, self.calls = release_every, 0
        torch.set_num_threads(max(1, threads))
        self.device = device_for(device)
        enable_tf32(self.device)
        self.dtype = getattr(torch, dtype) if self.device.type == "cuda" else torch.float32
        self.model = for_inference(load_first_stage(first_stage, storage, subfolder), self.device, self.dtype)
        self.columns = latent_columns(kind(self.model))
        self.text_encoder = None
        if text_encoder is not None:
            self.text_encoder = (
                load_text_encoder(text_encoder, storage, text_encoder_subfolder).to(self.device, self.dtype).eval()
            )
        side = resolution // factor(self.model)
        self.shape = (self.model.config.latent_channels, side, side)
        self.masked = concat == "masked"

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = pc.is_null(batch["reason"]).to_numpy(zero_copy_only=False)
        pixels = column_array(batch["pixels"])
        latents = encode_pixels(self.model, pixels[ok], self.device, self.dtype) if ok.any() else {}
        batch = batch.drop_columns(["pixels"])
        for name in self.columns:
            full = np.zeros((len(ok), *self.shape), np.float16)  # a dropped row's zeros are never written
            if name in latents:
                full[ok] = latents[name]
            batch = batch.append_column(name, tensor_column(full))
        if self.masked:  # the inpainting task's mask at the latent's size, and the masked image's latent
            batch = masked_columns(self.model, batch, pixels, ok, self.shape, self.device, self.dtype)
        if self.text_encoder is not None:
            batch = batch.append_column(
                TEXT_EMBEDDING, tensor_column(text_embeddings(self.text_encoder, token_ids(batch), self.device))
            )
        self.calls += 1
        if _malloc_trim is not None and self.release_every and self.calls % self.release_every == 0:
            _malloc_trim(0)
        return batch


@torch.no_grad()
def masked_columns(
    model,
    batch: pa.Table,
    pixels: np.ndarray,
    ok: np.ndarray,
    shape: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> pa.Table:
    """The pixel ``mask`` column replaced by the latent-size one, and ``masked_latent`` beside it."""
    masks = torch.tensor(column_array(batch[MASK]))  # a copy: Arrow's buffers are read-only
    small = latent_mask(masks, shape[1])[:, 0].to(torch.uint8).numpy()
    latent = np.zeros((len(ok), *shape), np.float16)
    if ok.any():
        images = image_tensor(pixels[ok]).to(device, dtype)
        latent[ok] = masked_latent(model, images, masks[ok].to(device, dtype)).float().cpu().numpy().astype(np.float16)
    return (
        batch.drop_columns([MASK])
        .append_column(MASK, tensor_column(small))
        .append_column(MASKED_LATENT, tensor_column(latent))
    )


def token_ids(batch: pa.Table) -> np.ndarray:
    """The ``input_ids`` column (fixed-size lists) as one rows x tokens array."""
    column = batch["input_ids"].combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


@torch.no_grad()
def text_embeddings(text_encoder: torch.nn.Module, ids: np.ndarray, device: torch.device) -> np.ndarray:
    """τθ(y) of each row's tokens, float16: what train_ldm's cross-attention reads instead of running τθ."""
    tokens = torch.tensor(ids, dtype=torch.long, device=device)  # a copy: Arrow's buffers are read-only
    return encode_text(text_encoder, tokens).float().cpu().numpy().astype(np.float16)
