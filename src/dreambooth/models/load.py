"""Find a local model folder's family, check it, and load it (the families live in sd.py, sdxl.py).

`detect_family` reads model_index.json and checks that every part the family needs is there,
`check_settings` that the settings ask only for what this model has, and `check_resolution` that
the training resolution maps to whole latents - all before a single weight is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DreamBoothError
from ..schedule import check_sampler
from .family import Components, ModelFamily, load_part
from .deepfloyd_if import IFStageIFamily, IFStageIIFamily
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily

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
                                  f"{', '.join(n for f in FAMILIES.values() for n in f.pipeline_class_names)} only")
        matches = [f for f in FAMILIES.values() if class_name in f.pipeline_class_names]
        if not matches:
            raise DreamBoothError(f"{model_dir} holds a {class_name or 'unknown'} pipeline; supported: "
                                  f"{', '.join(n for f in FAMILIES.values() for n in f.pipeline_class_names)} "
                                  "(or set model.family explicitly)")
        fam = matches[0]
    else:
        fam = FAMILIES[family]
    missing = [p for p in fam.parts if not (model_dir / p).is_dir() or not any((model_dir / p).iterdir())]
    if missing:
        raise DreamBoothError(f"{model_dir} is missing model part(s): {', '.join(missing)} (expected sub-folders "
                              f"{', '.join(fam.parts)}; re-copy or re-convert the model)")
    return fam


def check_resolution(resolution: int, model_dir: str | Path, fam: ModelFamily) -> None:
    """The training resolution must map to whole latents for this model (before any weight is loaded)."""
    factor = fam.latent_factor(Path(model_dir))
    if resolution % factor:
        raise DreamBoothError(f"data.resolution must be a multiple of {factor} for {model_dir} (its VAE downsamples by "
                              f"{factor}), got {resolution}; try {max(factor, resolution // factor * factor)}")


def check_settings(cfg, fam: ModelFamily, model_dir: str | Path) -> None:
    """Refuse settings this model cannot train with: a text encoder it does not have (text_encoder_2 on
    SD 1.x, say), a setting its family refuses (`ModelFamily.refuses`), or one its noise schedule has
    no use for (Min-SNR on a rectified-flow model, a DDPM sampler for it)."""
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


def model_folder(model) -> Path:
    """The diffusers folder for ModelConfig `model`: its path, or for a single-file checkpoint the
    folder converted from it (once; cached by the file's hash)."""
    from ..interop.single_file import cached_folder, is_single_file

    if is_single_file(model.path):
        return cached_folder(model.path, model.single_file_config, model.allow_pickle)
    return Path(model.path)


def load_components(model_dir: str | Path, family: str = "auto", vae_path: str | None = None) -> Components:
    """Load every part of the model in `model_dir`, frozen; training decides what to unfreeze."""
    fam = detect_family(model_dir, family)
    return fam.load(Path(model_dir), vae_path)
