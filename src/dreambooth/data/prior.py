"""Prior preservation's examples: what a run trains beside the subject photos.

- prior.source=images: each concept's class images, made by the base model itself (once; reused),
  at data.resolution, or with buckets at the sizes the concept's photos train at;
- prior.source=model: a class-prompt twin of each subject photo, whose target the frozen base
  predicts in the loop (models/frozen_base.py), so no images are made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import ConceptConfig, TrainConfig
from .buckets import class_image_counts, nearest_bucket
from .class_images import ClassImageSettings, ensure_class_images
from .dataset import Example, class_examples, class_prompt_twins


def class_image_settings(cfg: TrainConfig, concept: ConceptConfig) -> ClassImageSettings:
    """How `concept`'s class images are made: the prior section's sampler settings and the concept's prompts."""
    p = cfg.prior
    return ClassImageSettings(prompt=concept.class_prompt, num_images=p.num_class_images, resolution=cfg.data.resolution,
                              scheduler=p.scheduler, num_inference_steps=p.num_inference_steps,
                              guidance_scale=p.guidance_scale, negative_prompt=p.negative_prompt, seed=p.seed,
                              batch_size=p.batch_size, prompts=tuple(concept.class_prompts))


def ensure_concept_class_images(cfg: TrainConfig, concept: ConceptConfig, subject: list[Example], buckets,
                                model_dir: Path, device, dtype=torch.float32) -> list[Path]:
    """A concept's class images: at data.resolution square, or with buckets at the bucket sizes they will be used at.

    Bucketed, `prior.num_class_images` is split over the buckets of the concept's photos in proportion
    to their counts, each bucket's images in their own sub-folder CLASS_DIR/<height>x<width>.
    A folder of the user's own class images is used as it is (its images join the nearest bucket).
    """
    settings = class_image_settings(cfg, concept)
    if buckets is None or concept.class_images_user_supplied:
        return ensure_class_images(model_dir, concept.class_dir, settings, user_supplied=concept.class_images_user_supplied,
                                   device=device, dtype=dtype)
    folder = Path(concept.instance_dir).absolute()
    sizes = [nearest_bucket(e.image.width, e.image.height, buckets) for e in subject if e.path.parent == folder]
    files = []
    for (h, w), n in class_image_counts(sizes, cfg.prior.num_class_images).items():
        files += ensure_class_images(model_dir, Path(concept.class_dir) / f"{h}x{w}",
                                     dataclasses.replace(settings, num_images=n, size=(h, w)), device=device, dtype=dtype)
    return files


def prior_examples(cfg: TrainConfig, concepts: list[ConceptConfig], subject: list[Example], buckets, model_dir: Path,
                   accelerator, dtype: torch.dtype) -> list[Example]:
    """The class examples a run trains with (none without prior preservation).

    One process generates class images; the others wait, then find and reuse them."""
    if not cfg.prior.enabled:
        return []
    if cfg.prior.source == "model":
        return class_prompt_twins(subject, concepts)
    with accelerator.main_process_first():
        files = [ensure_concept_class_images(cfg, c, subject, buckets, model_dir, device=accelerator.device,
                                             dtype=dtype if accelerator.device.type == "cuda" else torch.float32)
                 for c in concepts]
    return class_examples(files, concepts, cfg.data)
