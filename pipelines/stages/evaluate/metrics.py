"""stage=evaluate's metric families, one object each: what task it applies to (``applies``), how many held-out
rows it needs (``rows``), and what it measures and draws (``measure``: a ``Measured``, or a ``Skipped`` that says
why it could not be measured here). The stage builds one ``Context`` and iterates over ``FAMILIES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from ldm.data.held_out import crops, training_captions
from ldm.data.images import normalise
from ldm.data.layouts import parse_layout
from ldm.diffusion.sampling import condition_captions
from ldm.metrics.adherence import adherence, held_out_prompts, held_out_scenes
from ldm.metrics.distribution import frechet_distance, image_features, kernel_distance
from ldm.metrics.reconstruction import evaluate_reconstruction
from ldm.metrics.restoration import inpainting_scores, super_resolution_scores
from ldm.metrics.scenes import class_accuracy, layout_accuracy, scene_distribution
from ldm.models.first_stage import load_first_stage
from ldm.models.image_conditioned import image_conditions
from ldm.storage import Storage, pretrained_directory
from ldm.synthetic.scene import parse_caption
from ldm.tasks import Task
from pipelines.driver.model_stage import generate


@dataclass
class Context:
    """What every metric reads: the stage's settings, the model as a diffusers pipeline, the train_ldm output's
    manifest, prepare's held-out rows (only those whose classes the model knows) and, on synthetic data, the
    synthesize output's manifest."""

    settings: Any
    storage: Storage
    pipeline: Any
    task: Task
    trained: dict[str, Any]
    held_out: dict[str, list[Any]]
    split: str  # how prepare chose the held-out rows, for the skip messages
    synthesized: dict[str, Any] | None

    @property
    def synthetic(self) -> bool:
        return self.synthesized is not None and self.synthesized.get("stage") == "synthesize"

    def generate(self, conditions: list[Any] | None, seeds: list[int]) -> np.ndarray:
        return generate(self.pipeline, self.settings, conditions, seeds)

    def seeds(self, count: int) -> list[int]:
        return [self.settings.seed + i for i in range(count)]

    def originals(self, count: int) -> np.ndarray:
        return crops(self.held_out["image"][:count], self.trained["facts"]["resolution"])

    def drawn_for(self, count: int) -> list[Any] | None:
        """What the first ``count`` held-out rows' images are drawn for: their caption, class or layout, their
        low-resolution or masked image, or nothing."""
        if self.task.concat:
            side = self.trained["facts"]["latent_shape"][1]
            return image_conditions(self.task.concat, self.originals(count), self.held_out["key"][:count], side)
        return self.held_out[self.task.condition][:count] if self.task.condition else None


@dataclass
class Measured:
    """A family's numbers (``metrics.json`` groups), and the images it drew with their captions."""

    metrics: dict[str, dict[str, float]]
    images: np.ndarray | None = None
    captions: list[str] = field(default_factory=list)
    per_image: list[dict[str, Any]] | None = None  # adherence's table


@dataclass
class Skipped:
    reason: str


def _no_held_out(context: Context) -> Skipped:
    return Skipped(f"no prepared row is held out ({context.split}): raise stage.held_out.fraction of prepare")


class Reconstruction:
    """The first stage's PSNR / SSIM on held-out images, as the latents were made with it."""

    name = "reconstruction"

    def applies(self, settings, task: Task) -> bool:
        return settings.reconstruction.enabled

    def rows(self, settings, task: Task) -> int:
        return settings.reconstruction.images if self.applies(settings, task) else 0

    def measure(self, context: Context) -> Measured | Skipped:
        images = context.held_out["image"][: context.settings.reconstruction.images]
        if not images:
            return _no_held_out(context)
        pixels = crops(images, context.trained["facts"]["resolution"])
        device = context.pipeline.device
        batches = (torch.from_numpy(normalise(pixels[i : i + 32])).to(device) for i in range(0, len(pixels), 32))
        # The first stage as the latents were made with it (a super-resolution pipeline's has the scale folded in).
        first = context.trained["facts"]["first_stage"]
        first_stage = load_first_stage(first["location"], context.storage, first.get("subfolder")).to(device)
        scores = evaluate_reconstruction(first_stage, batches, context.settings.reconstruction.scene_fidelity)
        return Measured({self.name: scores.as_dict()})


class Scenes:
    """Unconditional: how far the generated scenes' attributes are from the training data's, and how clean."""

    name = "scenes"

    def applies(self, settings, task: Task) -> bool:
        return task.condition is None and task.concat is None and settings.scenes.enabled

    def rows(self, settings, task: Task) -> int:
        return 0

    def measure(self, context: Context) -> Measured | Skipped:
        count = context.settings.scenes.images
        # The training data's scenes, as many as are generated: fewer would add their own sampling noise to the
        # distance.
        latents = context.trained["inputs"]["latents"]
        captions = training_captions(context.storage, latents, count) if context.synthetic else []
        real = [scene for scene in map(parse_caption, captions) if scene is not None]
        if not real:
            return Skipped(
                "scene distribution is measured on synthetic data only (stage.adherence.synthesized_url names "
                "its synthesize output), against the training rows' captions"
            )
        generated = context.generate(None, context.seeds(count))
        captions = [f"seed {seed}" for seed in context.seeds(len(generated))]
        return Measured({self.name: scene_distribution(real, generated)}, generated, captions)


class Adherence:
    """Text-to-image: images for held-out (colour, shape, background) prompts read back by the classifier."""

    name = "adherence"

    def applies(self, settings, task: Task) -> bool:
        return task.condition == "caption" and settings.adherence.enabled

    def rows(self, settings, task: Task) -> int:
        return 0

    def measure(self, context: Context) -> Measured | Skipped:
        settings = context.settings
        if not context.synthetic:
            return Skipped(
                f"stage.adherence.synthesized_url={settings.adherence.synthesized_url} is not a synthesize "
                "output: prompt adherence is measured on synthetic data only"
            )
        scenes = held_out_scenes(context.synthesized["facts"]["held_out"], settings.adherence.prompts, settings.seed)
        prompts = held_out_prompts(scenes, settings.adherence.seeds, settings.seed)
        texts = [p.text for p in prompts]
        generated = context.generate(texts, [p.seed for p in prompts])
        scores, per_image = adherence(prompts, generated)
        return Measured({self.name: scores}, generated, texts, per_image)


class Classes:
    """Class-conditional: how often an image shows the class it was drawn for."""

    name = "classes"

    def applies(self, settings, task: Task) -> bool:
        return task.condition == "label" and settings.classes.enabled

    def rows(self, settings, task: Task) -> int:
        return 0

    def measure(self, context: Context) -> Measured | Skipped:
        if not context.synthetic:
            return Skipped("class accuracy is read by the synthetic scenes' classifier: synthetic data only")
        known, each = context.trained["facts"]["classes"], context.settings.classes.images_per_class
        classes = [name for name in known for _ in range(each)]
        generated = context.generate(classes, context.seeds(len(classes)))
        shown = slice(0, len(classes), each)  # one image of each class
        return Measured({self.name: class_accuracy(classes, generated, len(known))}, generated[shown], classes[shown])


class Layouts:
    """Layout-to-image: box IoU, position and class of the object drawn for a held-out row's layout."""

    name = "layouts"

    def applies(self, settings, task: Task) -> bool:
        return task.condition == "boxes" and settings.layouts.enabled

    def rows(self, settings, task: Task) -> int:
        return settings.layouts.images if self.applies(settings, task) else 0

    def measure(self, context: Context) -> Measured | Skipped:
        boxes = [b for b in context.held_out["boxes"] if parse_layout(b)][: context.settings.layouts.images]
        if not context.synthetic or len(boxes) < 2:
            return Skipped(
                "layout accuracy is read by the synthetic scenes' classifier: synthetic data only, for the layouts "
                f"of held-out rows ({len(boxes)} found)"
            )
        generated = context.generate(boxes, context.seeds(len(boxes)))
        captions = condition_captions(context.pipeline, boxes, [])
        return Measured({self.name: layout_accuracy(boxes, generated)}, generated, captions)


class Restoration:
    """Super-resolution's PSNR / SSIM beside bicubic upsampling; inpainting's PSNR in the hole beside the
    surrounding mean fill, and outside it."""

    name = "restoration"

    def applies(self, settings, task: Task) -> bool:
        return bool(task.concat) and settings.restoration.enabled

    def rows(self, settings, task: Task) -> int:
        return settings.restoration.images if self.applies(settings, task) else 0

    def measure(self, context: Context) -> Measured | Skipped:
        count = min(context.settings.restoration.images, len(context.held_out["image"]))
        if count == 0:
            return _no_held_out(context)
        inputs, real = context.drawn_for(count), context.originals(count)
        generated = context.generate(inputs, context.seeds(count))
        if context.task.concat == "low_res":
            scores = {"super_resolution": super_resolution_scores(real, generated, np.stack(inputs))}
        else:
            scores = {"inpainting": inpainting_scores(real, generated, np.stack([mask for _, mask in inputs]))}
        return Measured(scores, generated, context.held_out["key"][:count])


class Fid:
    """FID / KID against held-out images, each generated for what its held-out image was, with the configured
    feature extractor (nothing is downloaded)."""

    name = "fid"

    def applies(self, settings, task: Task) -> bool:
        return True

    def rows(self, settings, task: Task) -> int:
        return settings.fid.images if settings.fid.feature_extractor else 0

    def measure(self, context: Context) -> Measured | Skipped:
        settings = context.settings.fid
        if not settings.feature_extractor:
            return Skipped(
                "stage.fid.feature_extractor is null: set it to a local (or s3://) vision model directory for FID / KID"
            )
        count = min(settings.images, len(context.held_out["image"]))
        if count < 2:
            return Skipped(f"{count} held-out image(s): FID needs at least 2")
        real, fake = context.originals(count), context.generate(context.drawn_for(count), context.seeds(count))
        model, processor = _feature_extractor(context.storage, settings.feature_extractor)
        model = model.to(context.pipeline.device)
        real_f, fake_f = image_features(model, processor, real), image_features(model, processor, fake)
        kid, kid_std = kernel_distance(real_f, fake_f, subset_size=settings.kid_subset_size)
        return Measured(
            {self.name: {"fid": frechet_distance(real_f, fake_f), "kid": kid, "kid_std": kid_std, "images": count}}
        )


def _feature_extractor(storage: Storage, location: str):
    """A vision model and its image processor: hub id, local directory or s3:// (fetched), one path."""
    with pretrained_directory(location, storage) as local:
        return AutoModel.from_pretrained(local).eval(), AutoImageProcessor.from_pretrained(local)


# In this order: the grid of the last family that draws is the one the output keeps.
FAMILIES = (Reconstruction(), Scenes(), Adherence(), Classes(), Layouts(), Restoration(), Fid())
