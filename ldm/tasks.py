"""The paper's tasks, one latent-diffusion machinery: what conditions the UNet and how, by name.

Each task names what its UNet takes (cross-attention to τθ of a condition, or nothing), what a latent row
must carry for it, and the diffusers pipeline that samples it (and
that its export is). The models themselves are built by ``ldm.models.text_to_image``: the UNet (with
cross-attention, or without conditioning input) and τθ.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    cross_attention: bool  # the UNet attends to τθ(condition) (UNet2DConditionModel); else UNet2DModel
    condition: str | None  # what a row is conditioned on ("caption": its tokens or τθ(y)); None: nothing
    pipeline: str  # the diffusers pipeline class that samples it and that stage=export writes

    @property
    def prompted(self) -> bool:
        """Whether sampling takes prompts (else it draws a number of images)."""
        return self.condition == "caption"


TASKS: dict[str, Task] = {
    "text_to_image": Task("text_to_image", cross_attention=True, condition="caption", pipeline="LDMTextToImagePipeline"),
    # The paper's unconditional models (CelebA-HQ, FFHQ, LSUN): z_t alone in, ε out.
    "unconditional": Task("unconditional", cross_attention=False, condition=None, pipeline="LDMPipeline"),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: choose one of {sorted(TASKS)}")
    return TASKS[name]
