"""The paper's tasks, one latent-diffusion machinery: what conditions the UNet and how, by name.

Each task names what its UNet takes (cross-attention to τθ of a condition, an image concatenated to z_t, or
nothing), what a latent row must carry for it, and the pipeline that samples it (and that its export is). The
models are built by ``ldm.models.text_to_image`` (the UNet, with cross-attention or without; the text τθ),
``ldm.models.conditioners`` (the class and layout τθ, and their pipeline) and ``ldm.models.image_conditioned``
(what super-resolution and inpainting concatenate, and the inpainting pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    cross_attention: bool  # the UNet attends to τθ(condition) (UNet2DConditionModel); else UNet2DModel
    # What a row is conditioned on, by its column: "caption" (its tokens, or τθ(y)), "label" (its class), "boxes"
    # (its layout), None (nothing); and what sampling takes: prompts, class names, layouts, or a number of images.
    condition: str | None
    pipeline: str  # the (diffusers) pipeline class that samples it and that stage=export writes
    # What is concatenated to z_t (the UNet's extra input channels), precomputed by encode_latents beside the
    # latents: "low_res" (the image downsampled to the latent's size, 3 channels), "masked" (the mask, and the
    # masked image's latent: 1 + c channels), or None.
    concat: str | None = None

    def extra_channels(self, latent_channels: int) -> int:
        return {"low_res": 3, "masked": 1 + latent_channels}.get(self.concat, 0)


TASKS: dict[str, Task] = {
    "text_to_image": Task(
        "text_to_image", cross_attention=True, condition="caption", pipeline="LDMTextToImagePipeline"
    ),
    # The paper's unconditional models (CelebA-HQ, FFHQ, LSUN): z_t alone in, ε out.
    "unconditional": Task("unconditional", cross_attention=False, condition=None, pipeline="LDMPipeline"),
    # The paper's ImageNet model: a learned class embedding, cross-attended; guidance against a null class.
    "class_conditional": Task(
        "class_conditional", cross_attention=True, condition="label", pipeline="ConditionedPipeline"
    ),
    # The paper's COCO / OpenImages model: boxes (class, corners) as tokens through a transformer τθ, cross-attended.
    "layout_to_image": Task("layout_to_image", cross_attention=True, condition="boxes", pipeline="ConditionedPipeline"),
    # The paper's ×4 super-resolution (f=4: the low-resolution image has the latent's size), concatenated to z_t.
    "super_resolution": Task(
        "super_resolution",
        cross_attention=False,
        condition=None,
        pipeline="LDMSuperResolutionPipeline",
        concat="low_res",
    ),
    # The paper's inpainting: the mask and the masked image's latent concatenated to z_t.
    "inpainting": Task(
        "inpainting", cross_attention=False, condition=None, pipeline="InpaintingPipeline", concat="masked"
    ),
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: choose one of {sorted(TASKS)}")
    return TASKS[name]
