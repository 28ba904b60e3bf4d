"""The paper's tasks, one latent-diffusion machinery: what conditions the UNet and how, by name.

Each task names what its UNet takes (cross-attention to τθ of a condition, or nothing), what a latent row
must carry for it, and the pipeline that samples it (and that its export is). The models are built by
``ldm.models.text_to_image`` (the UNet, with cross-attention or without conditioning input; the text τθ)
and ``ldm.models.class_conditional`` (the class τθ and its pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    cross_attention: bool  # the UNet attends to τθ(condition) (UNet2DConditionModel); else UNet2DModel
    # What a row is conditioned on: "caption" (its tokens, or τθ(y)), "label" (its class), None (nothing); and
    # what sampling takes: prompts, class names, or a number of images.
    condition: str | None
    pipeline: str  # the (diffusers) pipeline class that samples it and that stage=export writes

    @property
    def prompted(self) -> bool:
        return self.condition == "caption"


TASKS: dict[str, Task] = {
    "text_to_image": Task("text_to_image", cross_attention=True, condition="caption", pipeline="LDMTextToImagePipeline"),
    # The paper's unconditional models (CelebA-HQ, FFHQ, LSUN): z_t alone in, ε out.
    "unconditional": Task("unconditional", cross_attention=False, condition=None, pipeline="LDMPipeline"),
    # The paper's ImageNet model: a learned class embedding, cross-attended; guidance against a null class.
    "class_conditional": Task("class_conditional", cross_attention=True, condition="label", pipeline="ClassConditionalPipeline"),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: choose one of {sorted(TASKS)}")
    return TASKS[name]
