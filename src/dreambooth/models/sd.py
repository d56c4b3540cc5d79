"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a VAE latent space, no extra conditioning.

The VAE and UNet helpers here are plain functions, so SDXL (the same VAE and UNet call, more
conditioning) reuses them by calling them, not by inheriting from this family.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..schedule import DDPMSchedule
from .family import Components, load_part, module_device, own_scheduler


def vae_factor(model_dir: Path) -> int:
    """Pixels per latent along each side: 2 ** (VAE levels - 1), read from the VAE's config (8 for SD)."""
    config = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def load_vae(model_dir: Path, vae_path: str | None):
    """The folder's VAE, or a replacement VAE folder (model.vae_path, e.g. an fp16-safe SDXL VAE)."""
    from diffusers import AutoencoderKL

    if vae_path:
        return load_part("VAE", Path(vae_path), lambda: AutoencoderKL.from_pretrained(vae_path))
    return load_part("vae", model_dir / "vae", lambda: AutoencoderKL.from_pretrained(model_dir, subfolder="vae"))


def vae_encode(comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, H, W) in [-1, 1] -> the VAE posterior's mean and std, each (N, 4, H/f, W/f).

    We keep the distribution, not a sample, so that cached and uncached training draw the same
    latent sample from the same generator.
    """
    vae = comps.modules["vae"]
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def vae_latents(comps: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample the VAE posterior and scale to the UNet's unit-variance latent space."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
    return (mean + std * eps) * comps.modules["vae"].config.scaling_factor


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> token ids (N, 77), padded and truncated as the pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def unet_predict(comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    return comps.denoiser(noisy, timesteps, **cond).sample


# Export verification's probes (`ModelFamily.probe_inputs`): small fixed-seed inputs shaped from a module's config.

def unet_probe_inputs(config, generator: torch.Generator, context_dim: int | None = None) -> dict:
    """A UNet2DConditionModel's forward arguments: an 8x8 latent, timestep 500 and six text states of
    `context_dim` (default: its cross-attention width)."""
    return {"sample": torch.randn(1, config["in_channels"], 8, 8, generator=generator), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 6, context_dim or config["cross_attention_dim"], generator=generator)}


def text_probe_inputs(config, generator: torch.Generator) -> dict:
    """A text encoder's forward arguments: two rows of random token ids as long as its positions allow
    (16 for T5, which has no position limit), asking for every hidden state."""
    length = getattr(config, "max_position_embeddings", 16)
    return {"input_ids": torch.randint(0, config.vocab_size, (2, length), generator=generator), "output_hidden_states": True}


def vae_probe_inputs(config, generator: torch.Generator) -> dict:
    """An AutoencoderKL's `decode` arguments: a 4x4 latent."""
    return {"z": torch.randn(1, config["latent_channels"], 4, 4, generator=generator)}


RENDER_PROMPT = "a photo of a dog"  # export verification's one image (`ModelFamily.render_inputs`)


def smallest_side(unet_config, pixels_per_latent: int) -> int:
    """The smallest image side a UNet renders at: one latent pixel left after its last halving, rounded
    up to a multiple of 8 (the SD pipelines refuse other sides)."""
    side = pixels_per_latent * 2 ** (len(unet_config.block_out_channels) - 1)
    return -(-side // 8) * 8


class StableDiffusionFamily:
    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline",)
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    hub_tag = "stable-diffusion"  # the model card's tag
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    lora_targets = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj")}
    trains_with_identifier = True
    # The LDM single-file layout (AUTOMATIC1111, ComfyUI): part -> key prefix. The text encoder's
    # sub-prefix (transformer. for OpenAI CLIP, model. for SD 2.x's OpenCLIP) follows from its config.
    single_file = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
    refuses = {"export.save_text_encoder=False": "StableDiffusionPipeline cannot load without its text encoder"}
    identifier_embedding_file = True  # diffusers' load_textual_inversion, A1111's and ComfyUI's embeddings folder
    single_file_tables = {"unet": "unet", "vae": "vae", "text_encoder": "text"}
    single_file_configs = ("sd15", "sd2-512", "sd2-768-v")  # SD 1.5; SD 2.x's 512 base and 768-v (told apart by prediction)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}  # kohya's SD 1.x/2.x names

    def latent_factor(self, model_dir: Path) -> int:
        return vae_factor(model_dir)

    def resolution_step(self, model_dir: Path) -> int:
        return vae_factor(model_dir)  # a UNet: patch size 1

    def probe_inputs(self, module_name: str, config, generator: torch.Generator) -> dict:
        if module_name in self.text_encoders:
            return text_probe_inputs(config, generator)
        return unet_probe_inputs(config, generator) if module_name == self.denoiser else vae_probe_inputs(config, generator)

    def render_inputs(self, pipe) -> dict:
        side = smallest_side(pipe.unet.config, pipe.vae_scale_factor)
        return {"prompt": RENDER_PROMPT, "height": side, "width": side}

    def load(self, model_dir: Path, vae_path: str | None = None) -> Components:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = load_part("tokenizer", model_dir / "tokenizer", lambda: CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"))
        text_encoder = load_part("text_encoder", model_dir / "text_encoder",
                                 lambda: CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder"))
        vae = load_vae(model_dir, vae_path)
        unet = load_part("unet", model_dir / "unet", lambda: UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"))
        schedule = load_part("scheduler", model_dir / "scheduler", lambda: self.schedule(model_dir))
        inference_scheduler = load_part("scheduler", model_dir / "scheduler", lambda: own_scheduler(model_dir))
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
        for module in modules.values():
            module.requires_grad_(False)
        return Components(model_dir, self, modules, {"tokenizer": tokenizer}, schedule, inference_scheduler,
                          sources={"vae": Path(vae_path)} if vae_path else {})

    def schedule(self, model_dir: Path) -> DDPMSchedule:
        return DDPMSchedule.from_folder(model_dir)

    def encode_prompt(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> encoder_hidden_states (N, 77, D): the text encoder's last hidden states."""
        encoder = comps.modules["text_encoder"]
        ids = tokenize(comps.tokenizers["tokenizer"], prompts).to(module_device(encoder))
        return {"encoder_hidden_states": encoder(ids)[0]}

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_encode(comps, pixels)

    def latents_from(self, comps: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return vae_latents(comps, mean, std, generator)

    def conditioning(self, comps: Components, text: dict[str, torch.Tensor], batch, x0, generator) -> dict:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return unet_predict(comps, noisy, timesteps, cond)

    def pipeline(self, comps: Components, scheduler=None):
        from diffusers import StableDiffusionPipeline

        m = comps.modules
        return StableDiffusionPipeline(
            vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=comps.tokenizers["tokenizer"], unet=m["unet"],
            scheduler=scheduler if scheduler is not None else comps.inference_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def save_lora(self, comps: Components, folder: Path, trained: set[str], weight_name: str) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, **lora_layers(comps, trained), weight_name=weight_name,
                                                  safe_serialization=True)

    def sample_inputs(self, comps: Components, photos: list, n: int) -> dict[str, list]:
        return {}

    def prompt_kwargs(self, comps: Components, positive: dict, negative: dict, no_negative_prompt: bool) -> dict:
        return {"prompt_embeds": positive["encoder_hidden_states"], "negative_prompt_embeds": negative["encoder_hidden_states"]}

    def usage(self, model: str, base: str, lora: bool) -> list[str]:
        return pipeline_usage("StableDiffusionPipeline", model, base, lora)


def lora_layers(comps: Components, trained: set[str]) -> dict:
    """`save_lora_weights` keyword arguments for each trained module: its adapter weights, named as
    diffusers' loader reads them, and its LoRA config. Without the config the loader assumes
    alpha = rank, and an adapter trained with another alpha would load at the wrong strength.

    The denoiser's adapters keep peft's names (lora_A/lora_B), which the loader takes as they are.
    diffusers' own renaming covers only some layers (to_q.lora_A -> to_q.lora.down, but not IF's
    add_k_proj), and a file that mixes the two is read as peft, losing the renamed ones."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs = {}
    for name in sorted(trained):
        module = comps.modules[name]
        layers = get_peft_model_state_dict(module, save_embedding_layers=False)
        if name in comps.family.text_encoders:
            layers = convert_state_dict_to_diffusers(layers)
            # diffusers' text-encoder loader reads only its own names (lora_linear_layer.down/up) and
            # renames CLIP's projections alone; T5's q/k/v/o adapters would stay lora_A/B, which it
            # refuses ("Could not automatically infer state dict type"). Name every layer its way.
            layers = {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                      for k, v in layers.items()}
        kwargs[f"{name}_lora_layers"] = layers
        kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    return kwargs


def pipeline_usage(pipeline_class: str, model: str, base: str, lora: bool) -> list[str]:
    lines = [f"from diffusers import {pipeline_class}"]
    if lora:
        return lines + [f'pipe = {pipeline_class}.from_pretrained("{base}")', f'pipe.load_lora_weights("{model}")']
    return lines + [f'pipe = {pipeline_class}.from_pretrained("{model}")']
