"""First-stage latents as stored between encode_latents and train_ldm (the latent shards).

A KL first stage's posterior is stored whole, ``latent_mean`` and ``latent_logvar`` (float16, c x h x w), so
training can draw a fresh z ~ q(z|x) every epoch; a VQ first stage's quantized ``latent`` alone. Both as
Arrow's canonical fixed-shape tensor columns, which pyarrow, Ray Data and any Arrow reader understand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

KL_COLUMNS = ("latent_mean", "latent_logvar")
VQ_COLUMNS = ("latent",)


TEXT_EMBEDDING = "text_embedding"  # a frozen text encoder's τθ(y) of the row's tokens, when encode_latents wrote it
# What a task concatenates to z_t, when encode_latents wrote it (``ldm.tasks``): super-resolution's low-resolution
# image (uint8, h x w x 3 at the latent's size); inpainting's mask (uint8, 1 in the hole, h x w) and the masked
# image's latent (float16, c x h x w, unscaled).
LOW_RES, MASK, MASKED_LATENT = "low_res", "mask", "masked_latent"
CONCAT_COLUMNS = (LOW_RES, MASK, MASKED_LATENT)
CONCAT = {
    "low_res": {LOW_RES: "uint8"},
    "masked": {MASK: "uint8", MASKED_LATENT: "halffloat"},
}  # by the task's ``concat``: column -> type


def latent_columns(kind: str) -> tuple[str, ...]:
    return KL_COLUMNS if kind == "kl" else VQ_COLUMNS


def tensor_column(array: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def column_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column back to one N x ... numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


@dataclass
class LatentStats:
    """Per-channel sums over stored latents, enough for the mean and std of z ~ q(z|x) and for merging.

    For a KL posterior, Var[z] = Var[mean] + E[exp(logvar)]: the noise training adds is part of the spread
    that ``scale_factor`` (1 / std, as LDM computes it) normalises. VQ latents are deterministic.
    """

    count: int = 0  # elements per channel
    sum: list[float] = field(default_factory=list)
    sum_sq: list[float] = field(default_factory=list)
    sum_var: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, columns: dict[str, np.ndarray]) -> LatentStats:
        values = columns.get("latent_mean", columns.get("latent")).astype(np.float64)
        per_channel = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)
        variance = (
            np.exp(columns["latent_logvar"].astype(np.float64))
            .transpose(1, 0, 2, 3)
            .reshape(values.shape[1], -1)
            .sum(1)
            if "latent_logvar" in columns
            else np.zeros(values.shape[1])
        )
        return cls(
            per_channel.shape[1], per_channel.sum(1).tolist(), (per_channel**2).sum(1).tolist(), variance.tolist()
        )

    def merge(self, other: LatentStats) -> LatentStats:
        if not self.count:
            return other
        if not other.count:
            return self
        add = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731
        return LatentStats(
            self.count + other.count,
            add(self.sum, other.sum),
            add(self.sum_sq, other.sum_sq),
            add(self.sum_var, other.sum_var),
        )

    def summary(self) -> dict[str, object]:
        """Per-channel mean and std of z, the global std, and ``scale_factor`` = 1 / global std."""
        n = self.count
        total = np.array(self.sum), np.array(self.sum_sq), np.array(self.sum_var)
        mean = total[0] / n
        variance = total[1] / n - mean**2 + total[2] / n
        overall_mean = total[0].sum() / (n * len(mean))
        overall_variance = (total[1].sum() + total[2].sum()) / (n * len(mean)) - overall_mean**2
        std = float(np.sqrt(overall_variance))
        return {
            "channel_mean": mean.tolist(),
            "channel_std": np.sqrt(variance).tolist(),
            "global_mean": float(overall_mean),
            "global_std": std,
            "scale_factor": 1.0 / std,
        }
