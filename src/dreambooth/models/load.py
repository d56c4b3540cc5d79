"""Find a local model folder's family, check it, and load it (the families live in sd.py, sdxl.py,
deepfloyd_if.py). Only diffusers folders are read here: a single-file checkpoint becomes one in
`interop.single_file.model_folder`, before this module sees it.

`detect_family` reads model_index.json and checks that every part the family needs is there,
`check_settings` that the settings ask only for what this model has, and `check_resolution` that
the training resolution maps to whole latents - all before a single weight is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import DreamBoothError
from ..schedule import check_sampler
from .family import Components, ModelFamily, load_part
from .deepfloyd_if import IFStageIFamily, IFStageIIFamily
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # a model repository's id on the Hugging Face Hub: ORG/NAME
FAMILIES: dict[str, ModelFamily] = {"sd": StableDiffusionFamily(), "sdxl": StableDiffusionXLFamily(),
                                    "if": IFStageIFamily(), "if-ii": IFStageIIFamily()}
# Pipelines we recognise but cannot train, with what to do instead.
_NOT_YET = {
    "StableDiffusionUpscalePipeline": "Stable Diffusion x4 upscaler (use it at sampling time)",
}


def detect_family(model_dir: str | Path, family: str = "auto") -> ModelFamily:
    """Check that `model_dir` is a complete diffusers model folder and return its family."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise DreamBoothError(f"model folder not found: {model_dir}")
    if model_dir.is_file():
        raise DreamBoothError(f"{model_dir} is a file, not a diffusers model folder; single-file checkpoints "
                              "(.safetensors, .ckpt) are read through model.path or `dreambooth convert`")
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise DreamBoothError(f"{model_dir} is not a diffusers model folder: it has no model_index.json "
                              "(point model.path at the folder that holds model_index.json, unet/, vae/, ...)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise DreamBoothError(f"{index_path} is not valid JSON: {e}") from None
    class_name = index.get("_class_name", "")
    if family == "auto":
        if class_name in _NOT_YET:
            raise DreamBoothError(f"{model_dir} is a {_NOT_YET[class_name]} model ({class_name}); this version trains "
                                  f"the families {_families()} only")
        matches = [f for f in FAMILIES.values() if class_name in f.pipeline_class_names]
        if not class_name:  # a folder that names no pipeline may still be one a family reads
            raise DreamBoothError(f"{index_path} names no pipeline (_class_name); set model.family to the one it is: "
                                  f"{_families()}")
        if not matches:  # no model.family value could help: the families do not include this pipeline
            raise DreamBoothError(f"{model_dir} holds a {class_name} pipeline, which no family of this version trains; "
                                  f"the families are {_families()}")
        fam = matches[0]
    else:
        fam = FAMILIES[family]
    missing = [p for p in fam.parts if not (model_dir / p).is_dir() or not any((model_dir / p).iterdir())]
    if missing:
        raise DreamBoothError(f"{model_dir} is missing model part(s): {', '.join(missing)} (expected sub-folders "
                              f"{', '.join(fam.parts)}; re-copy or re-convert the model)")
    return fam


def _families() -> str:
    """'sd (StableDiffusionPipeline), sdxl (StableDiffusionXLPipeline), ...' for messages."""
    return ", ".join(f"{name} ({', '.join(f.pipeline_class_names)})" for name, f in FAMILIES.items())


def check_resolution(resolution: int, model_dir: str | Path, fam: ModelFamily) -> None:
    """The training resolution must map to whole latents, and whole patches of them, for this model
    (`ModelFamily.resolution_step`; before any weight is loaded)."""
    step = fam.resolution_step(Path(model_dir))
    if resolution % step:
        raise DreamBoothError(f"data.resolution must be a multiple of {step} for {model_dir} (its {fam.name} "
                              f"denoiser sees the image in steps of {step} pixels: latent factor x patch size), got "
                              f"{resolution}; try {max(step, resolution // step * step)}")


def check_settings(cfg, fam: ModelFamily, model_dir: str | Path) -> None:
    """Refuse settings this model cannot train with: a text encoder it does not have (text_encoder_2 on
    SD 1.x, say), a setting its family refuses (`ModelFamily.refuses`), or one its noise schedule has
    no use for (Min-SNR on a rectified-flow model, a DDPM sampler for it)."""
    if cfg.model.hub_id is not None and not HUB_ID.fullmatch(cfg.model.hub_id):
        raise DreamBoothError(f"model.hub_id must be a Hugging Face Hub id, ORG/NAME (e.g. "
                              f"stable-diffusion-v1-5/stable-diffusion-v1-5), got {cfg.model.hub_id!r}; a local path "
                              "goes in model.path")
    for name, te in cfg.text_encoders().items():
        if te.train and name not in fam.text_encoders:
            raise DreamBoothError(f"{name}.train=true, but {model_dir} ({fam.name}) has no {name}; its text encoders: "
                                  f"{', '.join(fam.text_encoders)}")
    embedding = [name for name, te in cfg.text_encoders().items() if te.train and te.scope == "identifier"]
    if embedding and cfg.train.method == "lora" and not getattr(fam, "identifier_embedding_file", False):
        raise DreamBoothError(f"{embedding[0]}.scope=identifier with train.method=lora cannot be used with {model_dir} "
                              f"({fam.name}): its pipeline cannot load the trained embedding back as a textual-inversion "
                              f"file; use train.method=full, or LoRA with {embedding[0]}.scope=all")
    for setting, why in fam.refuses.items():
        key, value = setting.split("=")
        section, field = key.split(".")
        if str(getattr(getattr(cfg, section), field)) == value:
            raise DreamBoothError(f"{key}={value.lower()} cannot be used with {model_dir} ({fam.name}): {why}")
    schedule = load_part("scheduler", Path(model_dir) / "scheduler", lambda: fam.schedule(Path(model_dir)))
    check_schedule_settings(cfg, schedule, f"{model_dir} ({fam.name})")


def check_schedule_settings(cfg, schedule, where: str) -> None:
    """The objective settings and the samplers asked for must be ones the model's noise schedule has."""
    schedule.check(cfg.objective, where)
    if cfg.validation.prompts:
        check_sampler(schedule, cfg.validation.scheduler, "validation.scheduler", where)
    generates = cfg.prior.enabled and cfg.prior.source == "images" and \
        not all(c.class_images_user_supplied for c in cfg.resolved_concepts())
    if generates or cfg.monitor.every_n_steps:  # class images, or the drift probe's own
        check_sampler(schedule, cfg.prior.scheduler, "prior.scheduler", where)


def load_components(model_dir: str | Path, family: str = "auto", vae_path: str | None = None) -> Components:
    """Load every part of the model in `model_dir`, frozen; training decides what to unfreeze."""
    fam = detect_family(model_dir, family)
    return fam.load(Path(model_dir), vae_path)
