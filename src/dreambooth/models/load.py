"""Load a base model from a local diffusers folder, behind one small per-family seam.

Everything that differs between model families lives in a `Family`: which parts a folder must
have, how prompts become UNet conditioning, how images become the UNet's input space, and which
pipeline renders samples. The training loop only talks to a `Family` and a `Components`, so SDXL
(two text encoders, size/crop conditioning) and DeepFloyd IF (T5, pixel space, class-label
conditioning for stage II) slot in as new families. Stable Diffusion 1.x/2.x is implemented.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DreamBoothError


@dataclass
class Components:
    """The parts of a text-to-image model that training touches."""

    model_dir: Path
    family: "Family"
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler holding the training noise schedule
    inference_scheduler: Any  # the folder's own sampler (e.g. PNDM for SD 1.5), kept for export

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


class StableDiffusionFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a VAE latent space, no extra conditioning."""

    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def load(self, model_dir: Path) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        def part(name, loader):
            try:
                return loader()
            except Exception as e:  # from_pretrained raises many types; the user needs the path and the part
                raise DreamBoothError(f"could not load the {name} from {model_dir / name}: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''} (is the folder complete and uncorrupted?)") from e

        tokenizer = part("tokenizer", lambda: CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"))
        text_encoder = part("text_encoder", lambda: CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"))
        vae = part("vae", lambda: AutoencoderKL.from_pretrained(model_dir, subfolder="vae"))
        unet = part("unet", lambda: UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"))
        noise_scheduler = part("scheduler", lambda: DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"))
        inference_scheduler = part("scheduler", lambda: _load_own_scheduler(model_dir))
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
        return Components(model_dir, self, unet, vae, text_encoder, tokenizer, noise_scheduler, inference_scheduler)

    def latent_factor(self, model_dir: Path) -> int:
        """Pixels per latent along each side: 2 ** (VAE levels - 1), read from the VAE's config (8 for SD)."""
        config = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)

    def tokenize(self, comps: Components, prompts: list[str]) -> torch.Tensor:
        """Prompts -> token ids (N, 77), padded and truncated as Stable Diffusion's pipeline does."""
        return comps.tokenizer(prompts, padding="max_length", max_length=comps.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids

    def encode_text(self, comps: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids (N, 77) -> the UNet's conditioning kwargs: encoder_hidden_states (N, 77, D)."""
        return {"encoder_hidden_states": comps.text_encoder(input_ids.to(comps.text_encoder.device))[0]}

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (N, 3, H, W) in [-1, 1] -> the VAE posterior's mean and std, each (N, 4, H/8, W/8).

        We keep the distribution, not a sample, so that cached and uncached training draw the same
        latent sample from the same generator.
        """
        dist = comps.vae.encode(pixels.to(comps.vae.device, comps.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from(self, comps: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample the VAE posterior and scale to the UNet's unit-variance latent space."""
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + std * eps) * comps.vae.config.scaling_factor

    def pipeline(self, comps: Components, scheduler=None):
        """A StableDiffusionPipeline over the (possibly training) components."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
            scheduler=scheduler if scheduler is not None else comps.inference_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


FAMILIES = {"sd": StableDiffusionFamily()}
# Pipelines we recognise but cannot train yet, with what to do instead.
_NOT_YET = {
    "StableDiffusionXLPipeline": "SDXL",
    "IFPipeline": "DeepFloyd IF",
    "IFSuperResolutionPipeline": "DeepFloyd IF",
}


def _load_own_scheduler(model_dir: Path):
    import diffusers

    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return cls.from_pretrained(model_dir, subfolder="scheduler")


def detect_family(model_dir: str | Path, family: str = "auto") -> "Family":
    """Check that `model_dir` is a complete diffusers model folder and return its family."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise DreamBoothError(f"model folder not found: {model_dir}")
    if model_dir.is_file():
        raise DreamBoothError(f"{model_dir} is a file; model.path must be a diffusers model folder. Convert a single-file "
                              "checkpoint first (e.g. StableDiffusionPipeline.from_single_file(...).save_pretrained(folder))")
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
                                  "Stable Diffusion 1.x/2.x only")
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


def check_resolution(resolution: int, model_dir: str | Path, fam: "Family") -> None:
    """The training resolution must map to whole latents for this model (before any weight is loaded)."""
    factor = fam.latent_factor(Path(model_dir))
    if resolution % factor:
        raise DreamBoothError(f"data.resolution must be a multiple of {factor} for {model_dir} (its VAE downsamples by "
                              f"{factor}), got {resolution}; try {max(factor, resolution // factor * factor)}")


def load_components(model_dir: str | Path, family: str = "auto") -> Components:
    """Load every part of the model in `model_dir`, frozen; training decides what to unfreeze."""
    fam = detect_family(model_dir, family)
    return fam.load(Path(model_dir))


Family = StableDiffusionFamily  # the shape every family follows
