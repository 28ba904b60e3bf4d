"""The paper's first-stage objective (CompVis ``LPIPSWithDiscriminator`` / ``VQLPIPSWithDiscriminator``).

Reconstruction (L1, plus LPIPS only when its weights are given: nothing is downloaded), the regulariser
(KL to N(0, I) weighted 1e-6, or the VQ codebook + commitment loss), and a PatchGAN discriminator with the
hinge loss that switches on at ``disc_start``, its generator term weighted adaptively by the ratio of the
reconstruction and adversarial gradient norms at the decoder's last layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.first_stage import Encoded


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (``NLayerDiscriminator`` in taming-transformers): a logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = 1
        for n in range(1, layers + 1):
            previous, width = width, min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [
                nn.Conv2d(channels * previous, channels * width, 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * width),
                nn.LeakyReLU(0.2, True),
            ]
        blocks.append(nn.Conv2d(channels * width, 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        for module in self.modules():  # the DCGAN initialisation taming uses
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


@dataclass
class LossWeights:
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 50001
    perceptual_weight: float = 1.0
    # Extra weight on pixels that differ from the image's median colour (1: off). Small objects on plain
    # backgrounds (the synthetic data) otherwise lose their colour to the background's share of the loss.
    foreground_weight: float = 1.0
    mse_weight: float = 0.0  # an L2 term beside L1 (0: off), which sharpens colour fidelity early


class FirstStageLoss(nn.Module):
    """Generator and discriminator losses for a KL (``kind="kl"``) or VQ first stage."""

    def __init__(self, kind: str, weights: LossWeights, perceptual: nn.Module | None = None, disc_layers: int = 3):
        super().__init__()
        self.kind, self.weights, self.perceptual = kind, weights, perceptual
        self.discriminator = PatchDiscriminator(layers=disc_layers)
        # CompVis's learned output log-variance: the reconstruction term is an NLL under a Laplacian.
        self.logvar = nn.Parameter(torch.zeros(())) if kind == "kl" else None

    def reconstruction(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-element reconstruction error, N x C x H x W, and the perceptual distance when LPIPS is on."""
        error = (inputs - reconstructions).abs()
        logs = {}
        if self.weights.mse_weight:
            error = error + self.weights.mse_weight * (inputs - reconstructions) ** 2
        if self.perceptual is not None and self.weights.perceptual_weight:
            distance = self.perceptual(inputs, reconstructions)
            error = error + self.weights.perceptual_weight * distance
            logs["p_loss"] = distance.mean().detach().item()
        if self.weights.foreground_weight != 1.0:
            background = inputs.flatten(2).median(dim=2).values[:, :, None, None]
            foreground = (inputs - background).abs().amax(dim=1, keepdim=True) > 0.1
            error = error * torch.where(foreground, self.weights.foreground_weight, 1.0)
        return error, logs

    def generator(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        encoded: Encoded,
        step: int,
        last_layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The autoencoder's loss at ``step``; ``last_layer`` is needed once the discriminator is on."""
        error, perceptual = self.reconstruction(inputs, reconstructions)
        batch = inputs.shape[0]
        if self.kind == "kl":
            nll = torch.sum(error / torch.exp(self.logvar) + self.logvar) / batch  # sums, as CompVis does
            regulariser = self.weights.kl_weight * encoded.kl().sum() / batch
        else:
            nll = error.mean()
            regulariser = self.weights.codebook_weight * encoded.codebook_loss.mean()
        logs = {"rec_loss": error.mean().detach().item(), "nll_loss": nll.detach().item(), **perceptual}
        logs["kl_loss" if self.kind == "kl" else "codebook_loss"] = regulariser.detach().item()
        loss = nll + regulariser
        if step >= self.weights.disc_start:
            g_loss = -self.discriminator(reconstructions).mean()
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach().item(), d_weight=float(d_weight))
        return loss, logs

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """Scale the adversarial term so its gradient at the decoder's last layer matches the reconstruction's."""
        if last_layer is None or not torch.is_grad_enabled():
            return torch.tensor(0.0)
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.weights.disc_weight

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int
    ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The hinge loss on real vs. reconstructed patches, or None before ``disc_start``."""
        if step < self.weights.disc_start:
            return None, {}
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "disc_loss": loss.detach().item(),
            "logits_real": logits_real.detach().mean().item(),
            "logits_fake": logits_fake.detach().mean().item(),
        }
