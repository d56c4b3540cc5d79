"""Stable Diffusion XL: two CLIP text encoders, a pooled text embedding, and size/crop conditioning.

What SDXL adds to Stable Diffusion (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models
for High-Resolution Image Synthesis", arXiv:2307.01952), as diffusers' StableDiffusionXLPipeline
computes it:

- prompt embeddings: the penultimate hidden states of CLIP ViT-L (text_encoder) and of OpenCLIP
  bigG (text_encoder_2), concatenated on the feature axis -> (N, 77, 768 + 1280);
- the pooled embedding: text_encoder_2's projected end-of-text state (`text_embeds`, (N, 1280));
  tokenizer_2 pads with "!", which the pooling at the end-of-text position ignores;
- micro-conditioning (section 2.2 of the paper): six numbers per image, the photo's original
  (height, width), the top-left corner of the crop taken from it (top, left) and the target
  (height, width), embedded by the UNet (`added_cond_kwargs["time_ids"]`). Training on crops
  while telling the model where the crop was is what lets it render uncropped subjects at
  inference, where the pipeline passes crop (0, 0);
- its VAE overflows in fp16, so it stays in fp32 (`keep_fp32`) unless model.vae_path names an
  fp16-safe replacement (e.g. madebyollin's sdxl-vae-fp16-fix, saved as a diffusers folder).

Everything else (the VAE encoding, the UNet call, the noise schedule) is SD's, reused from sd.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..schedule import DDPMSchedule
from .family import Components, load_part, module_device, own_scheduler
from .sd import (RENDER_PROMPT, lora_layers, pipeline_usage, smallest_side, text_probe_inputs, tokenize, unet_predict,
                 unet_probe_inputs, vae_encode, vae_factor, vae_latents, vae_probe_inputs)


def time_ids(original_sizes, crops, target_size, dtype=torch.float32, device=None) -> torch.Tensor:
    """(N, 6): [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per image (diffusers' order)."""
    rows = [[*orig, *crop, *target_size] for orig, crop in zip(original_sizes, crops)]
    return torch.tensor(rows, dtype=dtype, device=device)


class StableDiffusionXLFamily:
    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    parts = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    hub_tag = "stable-diffusion-xl"  # the model card's tag
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_targets = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
                    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj")}
    trains_with_identifier = True
    # The SGM single-file layout: CLIP ViT-L is the conditioner's embedder 0, OpenCLIP bigG embedder 1.
    single_file = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                   "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}
    # No: SDXL's pooled text embedding is taken at the highest token id in many text_encoder_2 configs
    # (eos_token_id 2, transformers' legacy rule), which a token added by load_textual_inversion becomes
    identifier_embedding_file = False
    buckets_by_default = True  # SDXL was trained on aspect-ratio buckets, with original size and crop as time ids
    refuses = {"export.save_text_encoder=False": "StableDiffusionXLPipeline cannot load without its text encoders"}
    single_file_tables = {"unet": "unet", "vae": "vae", "text_encoder": "text", "text_encoder_2": "text"}
    single_file_configs = ("sdxl-base",)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

    def latent_factor(self, model_dir: Path) -> int:
        return vae_factor(model_dir)

    def resolution_step(self, model_dir: Path) -> int:
        return vae_factor(model_dir)  # a UNet: patch size 1

    def probe_inputs(self, module_name: str, config, generator: torch.Generator) -> dict:
        if module_name in self.text_encoders:
            return text_probe_inputs(config, generator)
        if module_name != self.denoiser:
            return vae_probe_inputs(config, generator)
        inputs = unet_probe_inputs(config, generator)
        # the 6 size/crop ids and text_encoder_2's pooled embedding, whose width is what the time ids leave
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.randn(1, 6, generator=generator) * 100}
        return inputs

    def render_inputs(self, pipe) -> dict:
        side = smallest_side(pipe.unet.config, pipe.vae_scale_factor)
        return {"prompt": RENDER_PROMPT, "height": side, "width": side}

    def load(self, model_dir: Path, vae_path: str | None = None) -> Components:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from .sd import load_vae

        tokenizers = {name: load_part(name, model_dir / name, lambda n=name: CLIPTokenizer.from_pretrained(model_dir, subfolder=n))
                      for name in ("tokenizer", "tokenizer_2")}
        modules = {
            "unet": load_part("unet", model_dir / "unet", lambda: UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")),
            "vae": load_vae(model_dir, vae_path),
            "text_encoder": load_part("text_encoder", model_dir / "text_encoder",
                                      lambda: CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")),
            "text_encoder_2": load_part("text_encoder_2", model_dir / "text_encoder_2",
                                        lambda: CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")),
        }
        schedule = load_part("scheduler", model_dir / "scheduler", lambda: self.schedule(model_dir))
        inference_scheduler = load_part("scheduler", model_dir / "scheduler", lambda: own_scheduler(model_dir))
        for module in modules.values():
            module.requires_grad_(False)
        keep_fp32 = set() if vae_path else {"vae"}  # the stock SDXL VAE produces inf/NaN in fp16
        return Components(model_dir, self, modules, tokenizers, schedule, inference_scheduler, keep_fp32,
                          sources={"vae": Path(vae_path)} if vae_path else {})

    def schedule(self, model_dir: Path) -> DDPMSchedule:
        return DDPMSchedule.from_folder(model_dir)

    def encode_prompt(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> prompt_embeds (N, 77, D1 + D2) and pooled (N, P), as StableDiffusionXLPipeline.encode_prompt."""
        states = []
        for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            encoder = comps.modules[name]
            ids = tokenize(comps.tokenizers[tok], prompts).to(module_device(encoder))
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # penultimate layer, before the final layer norm
        pooled = out[0]  # text_encoder_2's projected end-of-text state, text_embeds (N, P)
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled": pooled}

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_encode(comps, pixels)

    def latents_from(self, comps: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return vae_latents(comps, mean, std, generator)

    def conditioning(self, comps: Components, text: dict[str, torch.Tensor], batch, x0, generator) -> dict:
        embeds = text["prompt_embeds"]
        ids = time_ids(batch.original_sizes, batch.crops, batch.target_size, dtype=embeds.dtype, device=embeds.device)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": text["pooled"], "time_ids": ids}}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return unet_predict(comps, noisy, timesteps, cond)

    def pipeline(self, comps: Components, scheduler=None):
        from diffusers import StableDiffusionXLPipeline

        m, t = comps.modules, comps.tokenizers
        return StableDiffusionXLPipeline(
            vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"], tokenizer=t["tokenizer"],
            tokenizer_2=t["tokenizer_2"], unet=m["unet"], scheduler=scheduler if scheduler is not None else comps.inference_scheduler,
            force_zeros_for_empty_prompt=self._force_zeros(comps), add_watermarker=False,
        )

    def save_lora(self, comps: Components, folder: Path, trained: set[str], weight_name: str) -> None:
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(folder, **lora_layers(comps, trained), weight_name=weight_name,
                                                    safe_serialization=True)

    def sample_inputs(self, comps: Components, photos: list, n: int) -> dict[str, list]:
        return {}

    def prompt_kwargs(self, comps: Components, positive: dict, negative: dict, no_negative_prompt: bool) -> dict:
        if no_negative_prompt and self._force_zeros(comps):  # what the pipeline does without a negative prompt
            negative = {k: torch.zeros_like(v) for k, v in negative.items()}
        return {"prompt_embeds": positive["prompt_embeds"], "pooled_prompt_embeds": positive["pooled"],
                "negative_prompt_embeds": negative["prompt_embeds"], "negative_pooled_prompt_embeds": negative["pooled"]}

    @staticmethod
    def _force_zeros(comps: Components) -> bool:
        index_path = comps.model_dir / "model_index.json"  # absent while a base is being built in memory
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        return index.get("force_zeros_for_empty_prompt", True)

    def usage(self, model: str, base: str, lora: bool) -> list[str]:
        return pipeline_usage("StableDiffusionXLPipeline", model, base, lora)
