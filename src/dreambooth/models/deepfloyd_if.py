"""DeepFloyd IF: a T5 text encoder and a cascade of pixel-space UNets (stage I 64 px, stage II 256 px).

What IF changes against Stable Diffusion, as diffusers' IFPipeline / IFSuperResolutionPipeline
compute it (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models with Deep Language
Understanding" (Imagen), whose design IF follows):

- Pixel space: no VAE, a latent factor of 1; the clean input x0 is the image itself.
- T5 prompts: padded to 77 tokens, the attention mask passed to T5 (not to the UNet, as in the
  pipelines), prompts lower-cased and stripped as the pipelines' caption cleaning does when its
  optional packages (bs4, ftfy) are missing.
- A learned variance: the UNet predicts (epsilon, variance), 6 channels for a 3-channel image. We
  train the simplified objective on the epsilon half only (Nichol & Dhariwal 2021's L_simple), so
  the variance half gets no gradient; sampling must then use a fixed variance, so the exported
  scheduler (and validation's) is switched to variance_type "fixed_small", as diffusers'
  train_dreambooth.py does.
- Stage II, the upscaler, sees the noisy 256 px image concatenated with a copy of the clean image
  shrunk to the stage I size, upscaled back (bilinear, as the pipeline does) and noised by its
  `image_noising_scheduler` at a random augmentation level, which it also receives as
  `class_labels` (Imagen's noise conditioning augmentation). This is what the pipeline feeds it at
  inference (at level 250 by default). diffusers' training scripts instead concatenate the noisy
  image with itself and pass the diffusion timestep as the label, a mismatch we do not copy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..schedule import DDPMSchedule
from .family import Components, load_part, module_device, own_scheduler
from .sd import RENDER_PROMPT, lora_layers, pipeline_usage, smallest_side, text_probe_inputs, unet_predict, unet_probe_inputs

T5_MAX_LENGTH = 77  # "the text encoder was trained with a max length of 77 for IF" (diffusers' IF pipelines)
LOW_RES_FACTOR = 4  # stage II upscales 4x (64 -> 256 px); its conditioning image is x0 shrunk by this much


def fixed_variance(scheduler):
    """The same scheduler with variance_type 'fixed_small': our training leaves the learned variance untrained."""
    if scheduler.config.get("variance_type") in ("learned", "learned_range"):
        return type(scheduler).from_config(scheduler.config, variance_type="fixed_small")
    return scheduler


def epsilon_half(prediction: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, 2C, H, W) epsilon + variance -> the epsilon half (N, C, H, W); other shapes pass through."""
    return prediction[:, :channels] if prediction.shape[1] == 2 * channels else prediction


def clean_prompt(prompt: str) -> str:
    """What the IF pipelines do to a prompt without bs4/ftfy installed (their clean_caption fallback)."""
    return prompt.lower().strip()


class _IFBase:
    hub_tag = "deepfloyd-if"
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    lora_targets = {"unet": ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"),  # add_*: IF's text K/V
                    "text_encoder": ("q", "k", "v", "o")}  # T5's attention projections
    refuses: dict[str, str] = {}
    single_file = None  # IF is published only as diffusers folders; no A1111/ComfyUI single-file layout exists
    single_file_tables = None
    single_file_configs: tuple[str, ...] = ()
    kohya_prefixes = None  # no kohya LoRA format for IF either
    trains_with_identifier = True
    identifier_embedding_file = False  # IF's pipelines have no textual-inversion loader (T5)
    buckets_by_default = False
    pipeline_class = ""
    stage_parts: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        return ("unet", "text_encoder", "tokenizer", "scheduler", *self.stage_parts)

    def latent_factor(self, model_dir: Path) -> int:
        return 1

    def resolution_step(self, model_dir: Path) -> int:
        return 1  # pixel space, a UNet

    def probe_inputs(self, module_name: str, config, generator: torch.Generator) -> dict:
        if module_name in self.text_encoders:
            return text_probe_inputs(config, generator)
        inputs = unet_probe_inputs(config, generator, config.get("encoder_hid_dim"))  # T5 states, projected inside
        if config.get("class_embed_type") == "timestep" or config.get("num_class_embeds"):  # stage II's noise level
            inputs["class_labels"] = torch.tensor([20])
        return inputs

    def render_inputs(self, pipe) -> dict:
        side = smallest_side(pipe.unet.config, 1)
        # clean_caption needs bs4 and ftfy, which we do not install; our prompts are cleaned as clean_prompt says
        inputs = {"height": side, "width": side, "clean_caption": False}
        if pipe.text_encoder is None:  # exported without it (export.save_text_encoder=false): T5 states of zeros
            zeros = torch.zeros(1, T5_MAX_LENGTH, pipe.unet.config.encoder_hid_dim)
            return {**inputs, "prompt_embeds": zeros, "negative_prompt_embeds": zeros}
        return {**inputs, "prompt": RENDER_PROMPT}

    def load(self, model_dir: Path, vae_path: str | None = None) -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import T5EncoderModel, T5Tokenizer

        tokenizer = load_part("tokenizer", model_dir / "tokenizer", lambda: T5Tokenizer.from_pretrained(model_dir, subfolder="tokenizer"))
        text_encoder = load_part("text_encoder", model_dir / "text_encoder",
                                 lambda: T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder"))
        unet = load_part("unet", model_dir / "unet", lambda: UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"))
        schedule = load_part("scheduler", model_dir / "scheduler", lambda: self.schedule(model_dir))
        inference_scheduler = fixed_variance(load_part("scheduler", model_dir / "scheduler", lambda: own_scheduler(model_dir)))
        extras = {name: load_part(name, model_dir / name, lambda n=name: DDPMScheduler.from_pretrained(model_dir, subfolder=n))
                  for name in self.stage_parts}
        modules = {"unet": unet, "text_encoder": text_encoder}
        for module in modules.values():
            module.requires_grad_(False)
        return Components(model_dir, self, modules, {"tokenizer": tokenizer}, schedule, inference_scheduler,
                          extras=extras)

    def schedule(self, model_dir: Path) -> DDPMSchedule:
        return DDPMSchedule.from_folder(model_dir)

    def encode_prompt(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> prompt_embeds (N, 77, D): T5's last hidden states, padding masked inside T5."""
        encoder = comps.modules["text_encoder"]
        tokens = comps.tokenizers["tokenizer"]([clean_prompt(p) for p in prompts], padding="max_length",
                                               max_length=T5_MAX_LENGTH, truncation=True, add_special_tokens=True,
                                               return_tensors="pt")
        device = module_device(encoder)
        return {"prompt_embeds": encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]}

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel space: the image is its own input, with no spread to sample."""
        return pixels, torch.zeros_like(pixels)

    def latents_from(self, comps: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return mean

    def save_lora(self, comps: Components, folder: Path, trained: set[str], weight_name: str) -> None:
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(folder, **lora_layers(comps, trained),
                                                                   weight_name=weight_name, safe_serialization=True)

    def usage(self, model: str, base: str, lora: bool) -> list[str]:
        lines = pipeline_usage(self.pipeline_class, model, base, lora)
        if lora:  # the exported full pipeline already carries the fixed-variance scheduler
            lines += ["# trained without the learned variance: sample with a fixed one",
                      'pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, variance_type="fixed_small")']
        return lines

    def sample_inputs(self, comps: Components, photos: list, n: int) -> dict[str, list]:
        return {}

    def prompt_kwargs(self, comps: Components, positive: dict, negative: dict, no_negative_prompt: bool) -> dict:
        return {"prompt_embeds": positive["prompt_embeds"], "negative_prompt_embeds": negative["prompt_embeds"]}

    def _pipeline_parts(self, comps: Components, scheduler) -> dict:
        return dict(tokenizer=comps.tokenizers["tokenizer"], text_encoder=comps.modules.get("text_encoder"),
                    unet=comps.modules["unet"], scheduler=scheduler if scheduler is not None else comps.inference_scheduler,
                    safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


class IFStageIFamily(_IFBase):
    """Stage I: text -> 64 px image (IFPipeline)."""

    name = "if"
    pipeline_class_names = ("IFPipeline",)
    pipeline_class = "IFPipeline"

    def conditioning(self, comps: Components, text: dict[str, torch.Tensor], batch, x0, generator) -> dict:
        return {"encoder_hidden_states": text["prompt_embeds"]}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return epsilon_half(unet_predict(comps, noisy, timesteps, cond), noisy.shape[1])

    def pipeline(self, comps: Components, scheduler=None):
        from diffusers import IFPipeline

        return IFPipeline(**self._pipeline_parts(comps, scheduler))


class IFStageIIFamily(_IFBase):
    """Stage II: a 64 px image + text -> 256 px image (IFSuperResolutionPipeline)."""

    name = "if-ii"
    pipeline_class_names = ("IFSuperResolutionPipeline",)
    pipeline_class = "IFSuperResolutionPipeline"
    stage_parts = ("image_noising_scheduler",)
    # diffusers' guide: the upscaler's prompt without the identifier ("a sks dog" -> "a dog"), since it
    # learns the subject's fine detail, not its name; concept.identifier names the word to drop
    trains_with_identifier = False
    refuses = {"prior.enabled=True": "class images for the upscaler would need the whole cascade; the seed's stage II "
               "recipes train without prior preservation (train stage I with it)",
               "prior.distills=True": "a distilled sample starts from the base's own sample, but the upscaler "
               "conditions on a low-resolution copy of the photo (prior.source=model, prior.preserve_weight > 0)"}

    def conditioning(self, comps: Components, text: dict[str, torch.Tensor], batch, x0, generator) -> dict:
        """The noised low-resolution copy of x0 and its noise level, as the pipeline conditions the upscaler."""
        low, level = degrade(x0, comps.extras["image_noising_scheduler"], generator)
        return {"encoder_hidden_states": text["prompt_embeds"], "class_labels": level, "image": low}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        cond = dict(cond)
        inputs = torch.cat([noisy, cond.pop("image").to(noisy.dtype)], dim=1)  # noisy target first, as the pipeline
        return epsilon_half(unet_predict(comps, inputs, timesteps, cond), noisy.shape[1])

    def render_inputs(self, pipe) -> dict:
        from PIL import Image

        inputs = super().render_inputs(pipe)
        low = max(1, inputs["height"] // LOW_RES_FACTOR)
        return {**inputs, "image": Image.new("RGB", (low, low), (128, 128, 128))}  # the low-resolution input

    def sample_inputs(self, comps: Components, photos: list, n: int) -> dict[str, list]:
        """Validation upscales the instance photos themselves, shrunk to the stage I size (the seed has users
        download a separate set of small images for this)."""
        from PIL import Image

        side = comps.modules["unet"].config.sample_size // LOW_RES_FACTOR
        small = [p.resize((side, side), Image.Resampling.BICUBIC) for p in photos]
        return {"image": [small[i % len(small)] for i in range(n)]}

    def pipeline(self, comps: Components, scheduler=None):
        from diffusers import IFSuperResolutionPipeline

        return IFSuperResolutionPipeline(**self._pipeline_parts(comps, scheduler),
                                         image_noising_scheduler=comps.extras["image_noising_scheduler"])


def degrade(x0: torch.Tensor, noising_scheduler, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage II's conditioning image: x0 (N, 3, H, W) shrunk LOW_RES_FACTOR times (area average), upscaled back
    bilinearly (align_corners=True, as IFSuperResolutionPipeline), noised at a level drawn uniformly from the
    noising schedule's steps. Returns the image (N, 3, H, W) and the levels (N,)."""
    n, _, h, w = x0.shape
    low = F.interpolate(x0.float(), size=(h // LOW_RES_FACTOR, w // LOW_RES_FACTOR), mode="area")
    up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)
    levels = torch.randint(0, noising_scheduler.config.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(up.shape, generator=generator)
    return noising_scheduler.add_noise(up, noise.to(up.device), levels).to(x0.dtype), levels.to(x0.device)
