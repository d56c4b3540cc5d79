"""What a run will do, decided before any weight loads: `preflight` and `plan_run`.

Every check that needs no weights runs here, so a bad setting, a missing model part, a photo that
cannot be read or a resume that cannot continue fails in seconds, before minutes of model loading or
class-image generation. `dreambooth train`, `dreambooth class-images` and the web UI share
`preflight`, so the three refuse the same inputs with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .compat import check_environment
from .config import ConceptConfig, TrainConfig
from .data.buckets import buckets_for
from .data.class_images import model_fingerprint
from .data.dataset import Example, subject_examples
from .errors import DreamBoothError
from .files import finish_swap
from .models.family import ModelFamily
from .interop.single_file import model_folder
from .models.load import check_resolution, check_settings, detect_family


@dataclass
class Preflight:
    """The model a configuration trains, checked against the settings (no weights loaded)."""

    model_dir: Path  # a diffusers folder (a single-file model.path: its converted, cached folder)
    family: ModelFamily
    buckets: list[tuple[int, int]] | None  # (height, width) sizes; None: square crops at data.resolution


@dataclass
class Plan:
    """A run's plan: its model, its concepts and photos, and where it starts."""

    model_dir: Path
    family: ModelFamily
    buckets: list[tuple[int, int]] | None
    concepts: list[ConceptConfig]
    subject: list[Example]  # every subject photo, read and checked
    fingerprint: str  # the base weights' identity, which a resume must match
    out: Path
    resume_from: Path | None  # the checkpoint a resume continues from
    start_step: int


def preflight(cfg: TrainConfig) -> Preflight:
    """Settings, installed packages, model folder, family, resolution and buckets: every check without weights."""
    cfg.validate()
    check_environment(cfg)  # installed packages can do what the settings ask
    model_dir = model_folder(cfg.model)  # a single-file checkpoint is converted (once) here
    family = detect_family(model_dir, cfg.model.family)
    check_settings(cfg, family, model_dir)
    check_resolution(cfg.data.resolution, model_dir, family)
    return Preflight(model_dir, family, buckets_for(cfg.data, family, family.resolution_step(model_dir)))


def plan_run(cfg: TrainConfig) -> Plan:
    """`preflight`, then the photos and the resume point; completes an export a kill interrupted."""
    checked = preflight(cfg)
    out = Path(cfg.train.output_dir)
    finish_swap(out)  # complete an export that a kill interrupted
    concepts = cfg.resolved_concepts()
    subject = subject_examples(concepts, cfg.data, without_identifier=not checked.family.trains_with_identifier)
    fingerprint = model_fingerprint(checked.model_dir)
    resume_from = ckpt.latest_checkpoint(out) if cfg.train.resume else None
    if cfg.train.resume and resume_from is None:
        raise DreamBoothError(f"train.resume is set but {ckpt.checkpoints_root(out)} has no checkpoint; "
                              "drop --train.resume to start a new run")
    if not cfg.train.resume and ckpt.latest_checkpoint(out) is not None:
        raise DreamBoothError(f"{out} already holds checkpoints of an earlier run: add --train.resume to continue it, "
                              "or choose another train.output_dir")
    start_step = ckpt.check_resume_compatible(resume_from, cfg, fingerprint) if resume_from else 0
    return Plan(checked.model_dir, checked.family, checked.buckets, concepts, subject, fingerprint, out, resume_from,
                start_step)
