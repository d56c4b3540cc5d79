"""A rectified-flow test family: a tiny real Stable Diffusion 3 (an MM-DiT transformer, two CLIP text encoders with
projection and a T5, a VAE with a shift, FlowMatchEulerDiscreteScheduler), written once as a diffusers folder.

It lives in the tests, not the package: the point is that a family unlike SD/SDXL/IF - a transformer trained by flow
matching - trains, resumes, distils and exports through the unchanged loop, objective and exporter, with only this
file knowing what an SD3 is. The component sizes follow the shapes of diffusers' SD3 fast-test dummies
(tests/pipelines/stable_diffusion_3), shrunk further, with the project's own CLIP and T5 tokenizers so nothing is
downloaded. Registered by the tests with `monkeypatch.setitem(load.FAMILIES, FlowFamily.name, FlowFamily())`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dreambooth.models.family import Components, load_part, module_device, own_scheduler
from dreambooth.models.sd import (RENDER_PROMPT, lora_layers, load_vae, pipeline_usage, text_probe_inputs, tokenize,
                                  vae_encode, vae_factor, vae_probe_inputs)
from dreambooth.schedule import FlowMatchSchedule
from dreambooth.tiny import T5_TOKENIZER_DIR, TOKENIZER_DIR

T5_MAX_LENGTH = 77  # diffusers' SD3 DreamBooth script trains with 77 T5 tokens (its pipeline samples with 256)
CLIP_WIDTH, T5_WIDTH = 16, 48  # the two CLIP states side by side (32) are zero-padded to T5's width, as SD3 pads them


class FlowFamily:
    """Stable Diffusion 3: joint text-image attention over [CLIP-L | CLIP-G (padded), T5] and the image patches."""

    name = "sd3-test"
    hub_tag = "stable-diffusion-3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
             "tokenizer_3", "scheduler")
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    clip = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    lora_targets = {"transformer": ("to_q", "to_k", "to_v", "to_out.0"),
                    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
                    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj")}
    refuses: dict[str, str] = {}
    single_file = None  # no single-file layout or kohya LoRA for it here: exports are diffusers folders and LoRA files
    single_file_tables = None
    single_file_configs: tuple[str, ...] = ()
    kohya_prefixes = None
    trains_with_identifier = True
    identifier_embedding_file = False
    buckets_by_default = False

    def latent_factor(self, model_dir: Path) -> int:
        return vae_factor(model_dir)

    def resolution_step(self, model_dir: Path) -> int:
        """The VAE's factor x the transformer's patch size: each token is a patch x patch square of latents."""
        patch = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())["patch_size"]
        return vae_factor(model_dir) * patch

    def probe_inputs(self, module_name: str, config, generator: torch.Generator) -> dict:
        if module_name in self.text_encoders:
            return text_probe_inputs(config, generator)
        if module_name != self.denoiser:
            return vae_probe_inputs(config, generator)
        side = 2 * config.patch_size  # 2 x 2 tokens
        return {"hidden_states": torch.randn(1, config.in_channels, side, side, generator=generator),
                "encoder_hidden_states": torch.randn(1, 6, config.joint_attention_dim, generator=generator),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
                "timestep": torch.tensor([500.0])}

    def render_inputs(self, pipe) -> dict:
        side = pipe.vae_scale_factor * pipe.transformer.config.patch_size * 2  # 2 x 2 tokens
        return {"prompt": RENDER_PROMPT, "height": side, "width": side}

    def schedule(self, model_dir: Path) -> FlowMatchSchedule:
        patch = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())["patch_size"]
        return FlowMatchSchedule.from_folder(model_dir, patch_size=patch)

    def load(self, model_dir: Path, vae_path: str | None = None) -> Components:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        tokenizers = {name: load_part(name, model_dir / name, lambda n=name: CLIPTokenizer.from_pretrained(model_dir, subfolder=n))
                      for name in ("tokenizer", "tokenizer_2")}
        tokenizers["tokenizer_3"] = load_part("tokenizer_3", model_dir / "tokenizer_3",
                                              lambda: T5Tokenizer.from_pretrained(model_dir, subfolder="tokenizer_3"))
        modules = {
            "transformer": load_part("transformer", model_dir / "transformer",
                                     lambda: SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")),
            "vae": load_vae(model_dir, vae_path),
            **{name: load_part(name, model_dir / name,
                               lambda n=name: CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder=n))
               for name in self.clip},
            "text_encoder_3": load_part("text_encoder_3", model_dir / "text_encoder_3",
                                        lambda: T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_3")),
        }
        for module in modules.values():
            module.requires_grad_(False)
        schedule = load_part("scheduler", model_dir / "scheduler", lambda: self.schedule(model_dir))
        inference_scheduler = load_part("scheduler", model_dir / "scheduler", lambda: own_scheduler(model_dir))
        return Components(model_dir, self, modules, tokenizers, schedule, inference_scheduler,
                          sources={"vae": Path(vae_path)} if vae_path else {})

    def encode_prompt(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> prompt_embeds (N, 77 + 77, T5 width) and pooled (N, 2 x projection), as
        StableDiffusion3Pipeline.encode_prompt: each CLIP's penultimate states side by side, zero-padded to T5's
        width, then T5's states after them; the pooled vector is both CLIPs' projected end-of-text states."""
        states, pooled = [], []
        for name, tok in self.clip.items():
            encoder = comps.modules[name]
            out = encoder(tokenize(comps.tokenizers[tok], prompts).to(module_device(encoder)), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = comps.modules["text_encoder_3"]
        ids = comps.tokenizers["tokenizer_3"](prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                              add_special_tokens=True, return_tensors="pt").input_ids
        t5_states = t5(ids.to(module_device(t5)))[0]  # (N, 77, T5 width)
        clip_states = torch.cat(states, dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"prompt_embeds": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
                "pooled": torch.cat(pooled, dim=-1)}

    def encode_images(self, comps: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_encode(comps, pixels)

    def latents_from(self, comps: Components, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """SD3's VAE latents are shifted, then scaled: (z - shift_factor) * scaling_factor (the pipeline inverts it)."""
        config = comps.modules["vae"].config
        eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        return (mean + std * eps - config.shift_factor) * config.scaling_factor

    def conditioning(self, comps: Components, text: dict[str, torch.Tensor], batch, x0, generator) -> dict:
        return {"encoder_hidden_states": text["prompt_embeds"], "pooled_projections": text["pooled"]}

    def predict(self, comps: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return comps.denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]

    def pipeline(self, comps: Components, scheduler=None):
        from diffusers import StableDiffusion3Pipeline

        m, t = comps.modules, comps.tokenizers
        return StableDiffusion3Pipeline(
            transformer=m["transformer"], scheduler=scheduler if scheduler is not None else comps.inference_scheduler,
            vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=t["tokenizer"], text_encoder_2=m["text_encoder_2"],
            tokenizer_2=t["tokenizer_2"], text_encoder_3=m["text_encoder_3"], tokenizer_3=t["tokenizer_3"])

    def save_lora(self, comps: Components, folder: Path, trained: set[str], weight_name: str) -> None:
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(folder, **lora_layers(comps, trained), weight_name=weight_name,
                                                   safe_serialization=True)

    def sample_inputs(self, comps: Components, photos: list, n: int) -> dict[str, list]:
        return {}

    def prompt_kwargs(self, comps: Components, positive: dict, negative: dict, no_negative_prompt: bool) -> dict:
        return {"prompt_embeds": positive["prompt_embeds"], "pooled_prompt_embeds": positive["pooled"],
                "negative_prompt_embeds": negative["prompt_embeds"], "negative_pooled_prompt_embeds": negative["pooled"]}

    def usage(self, model: str, base: str, lora: bool) -> list[str]:
        return pipeline_usage("StableDiffusion3Pipeline", model, base, lora)


def build_tiny_sd3(path: str | Path, **scheduler) -> Path:
    """Write the tiny SD3 folder: 32 px images, 16 x 16 latents in 2 x 2 patches (64 image tokens); `scheduler`
    overrides FlowMatchEulerDiscreteScheduler's config (SD3 ships shift 3.0)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    t5_tokenizer = T5Tokenizer.from_pretrained(T5_TOKENIZER_DIR)
    clip = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_size=CLIP_WIDTH,
                          intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=CLIP_WIDTH,
                          hidden_act="gelu")
    torch.manual_seed(0)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip)
    torch.manual_seed(0)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, num_layers=1, num_heads=2, d_kv=8, d_ff=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=t5_tokenizer.pad_token_id))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                        caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **scheduler}), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(path)
    return Path(path)
