"""LPIPS (Zhang et al., 2018) with VGG16 features, the perceptual term of the paper's first-stage loss.

Built from weight files the user already has, never downloaded: torchvision's VGG16 (``vgg16-397923af.pth``,
keys ``features.N.*``) and the LPIPS linear heads (``vgg.pth`` of taming-transformers or the ``lpips``
package, keys ``linK.model.1.weight``), or one file holding a whole LPIPS state dict (``net.sliceK.N.*``
plus ``linK.*``). ``.safetensors`` or torch pickles, local or ``s3://``.

The network is frozen, so its weights are non-persistent buffers: nothing trains them and the loss's
checkpoint does not carry 58 MB of VGG.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import nn

from ldm.storage import Storage

# VGG16's convolutions by torchvision ``features`` index; LPIPS reads the ReLU after the last one of each block.
CONVS = {
    0: (3, 64),
    2: (64, 64),
    5: (64, 128),
    7: (128, 128),
    10: (128, 256),
    12: (256, 256),
    14: (256, 256),
    17: (256, 512),
    19: (512, 512),
    21: (512, 512),
    24: (512, 512),
    26: (512, 512),
    28: (512, 512),
}
TAPS = (2, 7, 14, 21, 28)
POOL_BEFORE = (5, 10, 17, 24)
# The ImageNet statistics LPIPS's ScalingLayer applies to [-1, 1] inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

_VGG_KEY = re.compile(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d)\.model\.1\.weight$")


class LPIPS(nn.Module):
    """Distance between two batches in [-1, 1]: N x 1 x 1 x 1, 0 for identical images."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        vgg, lin, other = {}, {}, []
        for key, value in state.items():
            if match := _VGG_KEY.match(key):
                vgg[(int(match[1]), match[2])] = value
            elif match := _LIN_KEY.match(key):
                lin[int(match[1])] = value
            else:
                other.append(key)
        missing = [f"features.{i}.{p}" for i in CONVS for p in ("weight", "bias") if (i, p) not in vgg]
        missing += [f"lin{k}.model.1.weight" for k in range(len(TAPS)) if k not in lin]
        if missing:
            raise ValueError(
                f"LPIPS weights lack {len(missing)} tensor(s), e.g. {missing[:3]}; expected torchvision's VGG16 "
                f"(features.N.weight/bias) and the LPIPS heads (linK.model.1.weight). Keys found that are neither: "
                f"{sorted(other)[:5]}"
            )
        for index, (c_in, c_out) in CONVS.items():
            weight = vgg[(index, "weight")]
            if tuple(weight.shape) != (c_out, c_in, 3, 3):
                raise ValueError(
                    f"LPIPS weights: features.{index}.weight is {tuple(weight.shape)}, expected {(c_out, c_in, 3, 3)}"
                )
            self.register_buffer(f"conv{index}_weight", weight.float().clone(), persistent=False)
            self.register_buffer(f"conv{index}_bias", vgg[(index, "bias")].float().clone(), persistent=False)
        for k, tap in enumerate(TAPS):
            weight = lin[k]
            if tuple(weight.shape) != (1, CONVS[tap][1], 1, 1):
                raise ValueError(
                    f"LPIPS weights: lin{k}.model.1.weight is {tuple(weight.shape)}, "
                    f"expected {(1, CONVS[tap][1], 1, 1)}"
                )
            self.register_buffer(f"lin{k}", weight.float().clone(), persistent=False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        taps = []
        for index in CONVS:
            if index in POOL_BEFORE:
                x = F.max_pool2d(x, 2)
            x = F.relu(F.conv2d(x, getattr(self, f"conv{index}_weight"), getattr(self, f"conv{index}_bias"), padding=1))
            if index in TAPS:
                taps.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        both = self.features(torch.cat([inputs, reconstructions]).float())
        distance = 0.0
        for k, features in enumerate(both):
            a, b = features.chunk(2)
            distance = distance + F.conv2d((a - b) ** 2, getattr(self, f"lin{k}")).mean(dim=(2, 3), keepdim=True)
        return distance


def load_lpips(paths: Sequence[str], storage: Storage | None = None) -> LPIPS | None:
    """LPIPS from the given weight files (merged in order), or None when none are configured."""
    if not paths:
        return None
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        if path.startswith(("s3://", "s3a://")):
            if storage is None:
                raise ValueError(f"reading LPIPS weights at {path} needs the storage config")
            fs, key = storage.fsspec(path)
            with fs.open(key, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        if path.endswith(".safetensors"):
            state.update(load_safetensors(data))
        else:
            state.update(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return LPIPS(state).requires_grad_(False).eval()
