"""A tiny random model of the real Stable Diffusion architecture, and a few synthetic photos.

For smoke runs, tests and CPU benchmarks: every component is a real diffusers/transformers
class built from a small config right after `torch.manual_seed(0)` (as diffusers'
`get_dummy_components`), written with `save_pretrained`, so loading it exercises exactly the
`from_pretrained` path a real SD 1.5 folder takes. The tokenizer is a real CLIP BPE tokenizer cut
down to 2,000 merges (made by scripts/make_clip_tokenizer.py from CLIP's merge list).

    python -m dreambooth.tiny ./tiny-sd ./tiny-photos     # writes both
    python -m dreambooth.tiny --sdxl ./tiny-sdxl ./tiny-photos     # the SDXL-shaped model instead
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
RESOLUTION = 32  # pixels; the tiny VAE halves it once -> 16x16 latents


def _sd_unet(channels, layers, cross_dim, heads, groups=32, linear_projection=False):
    n = len(channels)
    return dict(block_out_channels=tuple(channels), layers_per_block=layers, cross_attention_dim=cross_dim,
                attention_head_dim=heads, norm_num_groups=groups, use_linear_projection=linear_projection,
                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))


def _vae(channels, groups=32):
    n = len(channels)
    return dict(block_out_channels=tuple(channels), norm_num_groups=groups, layers_per_block=2 if n == 4 else 1,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


# Named architectures with random weights. "tiny" is what the tests train; "small" is a CPU
# benchmark size; "sd15" and "sd2" are the public Stable Diffusion 1.5 and 2.x configs
# (UNet 859.5 M / 865.9 M parameters, CLIP ViT-L / OpenCLIP ViT-H text encoders) for GPU benchmarks.
ARCHITECTURES = {
    "tiny": dict(resolution=32, prediction_type="epsilon",
                 unet=_sd_unet((32, 64), 1, 32, 8, groups=16),
                 vae=_vae((16, 32), groups=16),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
    # SD 2.x's shape in miniature: linear attention projections, an OpenCLIP-style (GELU) text
    # encoder, v-prediction; for the single-file tests, where SD 2.x's layout differs from 1.x's.
    "tiny-sd2": dict(resolution=32, prediction_type="v_prediction",
                     unet=_sd_unet((32, 64), 1, 32, 8, groups=16, linear_projection=True),
                     vae=_vae((16, 32), groups=16),
                     text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               hidden_act="gelu")),
    "small": dict(resolution=128, prediction_type="epsilon",
                  unet=_sd_unet((64, 128, 256), 1, 256, 8),
                  vae=_vae((32, 64, 128, 128)),
                  text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)),
    "sd15": dict(resolution=512, prediction_type="epsilon",
                 unet=_sd_unet((320, 640, 1280, 1280), 2, 768, 8),
                 vae=_vae((128, 256, 512, 512)),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           vocab_size=49408, hidden_act="quick_gelu")),
    "sd2": dict(resolution=768, prediction_type="v_prediction",
                unet=_sd_unet((320, 640, 1280, 1280), 2, 1024, (5, 10, 20, 20), linear_projection=True),
                vae=_vae((128, 256, 512, 512)),
                text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          vocab_size=49408, hidden_act="gelu")),
}


def _sdxl_unet(channels, layers, transformer_layers, heads, cross_dim, time_dim, pooled_dim, groups=32):
    n = len(channels)  # SDXL: no attention at the top (largest) level, linear projections, text_time conditioning
    return dict(block_out_channels=tuple(channels), layers_per_block=layers,
                transformer_layers_per_block=transformer_layers,
                attention_head_dim=heads, cross_attention_dim=cross_dim, norm_num_groups=groups, use_linear_projection=True,
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + pooled_dim)  # 6 time ids + text_encoder_2's pool


# SDXL-shaped architectures (two text encoders; the UNet attends to their penultimate hidden states concatenated, and
# gets text_encoder_2's projected pool plus 6 size/crop ids). "tiny" is for tests: its widths all differ
# (text 32 + text_2 64 = cross 96; pool 48; 6 x 16 + 48 = 144) so swapping encoders, or pooler_output for text_embeds,
# fails on shapes instead of silently. "sdxl" is SDXL base 1.0 (UNet 2.57 B parameters, CLIP ViT-L + OpenCLIP
# bigG text encoders, VAE scaling 0.13025) for GPU benchmarks.
SDXL_ARCHITECTURES = {
    "tiny": dict(resolution=32, prediction_type="epsilon",
                 unet=_sdxl_unet((32, 64), 1, (1, 2), (2, 4), 32 + 64, 16, 48, groups=16),
                 vae={**_vae((16, 32), groups=16), "scaling_factor": 0.13025},
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 text_2=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=48, hidden_act="gelu")),
    "sdxl": dict(resolution=1024, prediction_type="epsilon",
                 unet=_sdxl_unet((320, 640, 1280), 2, (1, 2, 10), (5, 10, 20), 768 + 1280, 256, 1280),
                 vae={**_vae((128, 256, 512, 512)), "scaling_factor": 0.13025},
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
                 text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             vocab_size=49408, hidden_act="gelu", projection_dim=1280)),
}


def build_sd(path: str | Path, arch: str = "tiny", prediction_type: str | None = None) -> Path:
    """Write an SD-shaped pipeline folder (model_index.json, unet/, vae/, ...) with random weights to `path`."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = ARCHITECTURES[arch]
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    downsample = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=spec["resolution"] // downsample, in_channels=4, out_channels=4, **spec["unet"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=spec["resolution"], **spec["vae"])
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), **spec["text"]}  # big archs keep CLIP's 49,408-row embedding
    text_encoder = CLIPTextModel(CLIPTextConfig(
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **text))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              prediction_type=prediction_type or spec["prediction_type"], clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_sd(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """The tiny model the tests train (32 px, 16x16 latents)."""
    return build_sd(path, "tiny", prediction_type)


def build_sdxl(path: str | Path, arch: str = "tiny") -> Path:
    """Write an SDXL-shaped pipeline folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, ...)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = SDXL_ARCHITECTURES[arch]
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")  # as SDXL's: pads with "!", not <|endoftext|>
    downsample = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=spec["resolution"] // downsample, in_channels=4, out_channels=4, **spec["unet"])
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=spec["resolution"], **spec["vae"])

    def text_config(tok, text):  # eos_token_id is what CLIP pools at; the "!" padding must not be mistaken for it
        return CLIPTextConfig(max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **{"vocab_size": len(tok), **text})

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(tokenizer, spec["text"]))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, spec["text_2"]))
    # What SDXL base ships; the trainer reads this config into a DDPMScheduler for training.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type=spec["prediction_type"], steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_sdxl(path: str | Path) -> Path:
    """The tiny SDXL-shaped model for tests (32 px, 16x16 latents)."""
    return build_sdxl(path, "tiny")


def write_photos(folder: str | Path, n: int, seed: int = 0, size: int = 40) -> list[Path]:
    """Write `n` small, distinct PNG 'photos' (a coloured square on a gradient) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = np.zeros((size, size, 3), dtype=np.uint8)
        img[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
        img[..., 1] = rng.integers(0, 255)
        x, y = rng.integers(0, size // 2, size=2)
        img[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, size=3)
        path = folder / f"photo_{i:02d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def build_tiny_dino(path: str | Path, image_size: int = 32) -> Path:
    """A tiny random ViT in DINO's format (transformers ViTModel, 16-px patches, ImageNet normalisation in its
    preprocessor_config.json), standing in for facebook/dino-vits16 in the evaluation tests."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=image_size, patch_size=16, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return Path(path)


def build_tiny_clip(path: str | Path, image_size: int = 32) -> Path:
    """A tiny random CLIPModel with the bundled CLIP BPE tokenizer and a CLIP image processor config, standing in
    for openai/clip-vit-large-patch14 in the evaluation tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **layers),
        vision_config=dict(image_size=image_size, patch_size=16, **layers), projection_dim=16))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return Path(path)


T5_TOKENIZER_DIR = Path(__file__).parent / "assets" / "t5_tokenizer"


def _if_unet(channels, layers, cross_dim, text_dim, head_dim, pool_heads, **extra):
    n = len(channels)  # IF: plain resnets at the top level, SimpleCrossAttn (text as added K/V) below, and an
    # attention-pooled copy of the raw T5 states (width text_dim) added to the time embedding
    return dict(block_out_channels=tuple(channels), layers_per_block=layers, cross_attention_dim=cross_dim,
                encoder_hid_dim=text_dim, attention_head_dim=head_dim, addition_embed_type="text",
                addition_embed_type_num_heads=pool_heads, cross_attention_norm="group_norm",
                resnet_time_scale_shift="scale_shift", act_fn="gelu", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
                up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",), **extra)


def _t5(d_model, layers, heads, d_kv, d_ff):  # T5 v1.1 encoder (gated-GELU feed-forward), as IF's T5-XXL
    return dict(d_model=d_model, num_layers=layers, num_heads=heads, d_kv=d_kv, d_ff=d_ff,
                feed_forward_proj="gated-gelu")


# DeepFloyd IF-shaped architectures: pixel-space cascade, no VAE; every UNet predicts noise and a variance
# (out_channels 6, scheduler variance_type "learned_range"); the stage II upscaler takes the noisy image and the
# noised, upscaled low-resolution image side by side (in_channels 6) and the upscaler's noise level as a class label
# (class_embed_type "timestep"). "tiny" follows diffusers' IF test dummies (tests/pipelines/deepfloyd_if/__init__.py)
# but with text 32 != cross attention 64, as in the real model, so raw and projected text states cannot be swapped
# unnoticed; stage I makes 32 px, stage II 32 -> 64 px. "if" is IF-I-XL-v1.0 stage I for GPU benchmarks, config only:
# UNet 4.30 B parameters (704 base channels x (1, 2, 3, 4), 3 resnets a level, cross attention 2816 wide; the model
# card says 4.3 B), T5-v1.1-XXL encoder 4.76 B (vocab 32,128 rows for 32,100 tokens), 64 px. The widths were
# reconstructed from IF's UNet layout and checked against that total, not read from the shipped config.json.
IF_ARCHITECTURES = {
    "tiny": dict(text=_t5(32, 2, 4, 8, 64),
                 stage1=dict(resolution=32, unet=_if_unet((32, 64), 1, 64, 32, 8, 2)),
                 stage2=dict(resolution=64, unet=_if_unet((32, 64), (1, 2), 64, 32, 8, 2, class_embed_type="timestep",
                                                          mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                                                          time_embedding_dim=32))),
    "if": dict(text={**_t5(4096, 24, 64, 64, 10240), "vocab_size": 32128},
               stage1=dict(resolution=64, unet=_if_unet((704, 1408, 2112, 2816), 3, 2816, 4096, 64, 64))),
}


def _if_scheduler(stage: int):
    """The denoising scheduler IF ships (diffusers' scripts/convert_if.py): cosine betas, learned-range variance,
    dynamic thresholding at the 95th percentile, clipping to 1.5 for stage I and 1.0 for the upscaler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         variance_type="learned_range", thresholding=True, dynamic_thresholding_ratio=0.95,
                         sample_max_value=1.5 if stage == 1 else 1.0)


def build_if(path: str | Path, stage: int = 1, arch: str = "tiny") -> Path:
    """Write a DeepFloyd IF-shaped folder: stage 1 an IFPipeline (unet/, text_encoder/ T5EncoderModel, tokenizer/ T5,
    scheduler/), stage 2 an IFSuperResolutionPipeline (the same plus image_noising_scheduler/). No safety checker,
    feature extractor or watermarker. Both stages of one arch get the same T5 (same config, same seed), so prompt
    embeddings from stage I can be handed to stage II as IF's own usage does."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    spec = IF_ARCHITECTURES[arch]
    if f"stage{stage}" not in spec:
        stages = sorted(int(k[5:]) for k in spec if k.startswith("stage"))
        raise ValueError(f"IF architecture {arch!r} has no stage {stage} (it has {stages})")
    unet_spec = spec[f"stage{stage}"]
    tokenizer = T5Tokenizer.from_pretrained(T5_TOKENIZER_DIR)
    torch.manual_seed(0)
    # out: noise and variance (3 + 3); in, stage 2: the noisy image and the noised upscaled low-res image (3 + 3)
    unet = UNet2DConditionModel(sample_size=unet_spec["resolution"], in_channels=3 if stage == 1 else 6, out_channels=6,
                                **unet_spec["unet"])
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer), **spec["text"]}  # "if" keeps T5-XXL's 32,128-row embedding
    text_encoder = T5EncoderModel(T5Config(
        is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **text))
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=_if_scheduler(stage),
                 safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    if stage == 1:
        pipe = IFPipeline(**parts)
    else:  # image_noising_scheduler noises the upscaled low-res image to the call's noise_level (default 250)
        noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        pipe = IFSuperResolutionPipeline(**parts, image_noising_scheduler=noising)
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_if(path: str | Path, stage: int = 1) -> Path:
    """The tiny IF-shaped model for tests: stage 1 makes 32 px images, stage 2 upscales them to 64 px."""
    return build_if(path, stage, "tiny")


def build_tiny_x4_upscaler(path: str | Path) -> Path:
    """A tiny StableDiffusionUpscalePipeline (the x4 latent upscaler: UNet input = 4 latent channels + the 3-channel
    low-resolution image, noise level as class label, a VAE that upsamples 4x) for the cascade's optional last stage."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=16, use_linear_projection=True, num_class_embeds=1000)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32), norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        scaling_factor=0.08333)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
                                          max_noise_level=350)
    pipe.save_pretrained(path)
    return Path(path)


if __name__ == "__main__":
    sdxl = "--sdxl" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--sdxl"]
    model_dir = (build_tiny_sdxl if sdxl else build_tiny_sd)(args[0] if args else "tiny-sdxl" if sdxl else "tiny-sd")
    photos = write_photos(args[1] if len(args) > 1 else "tiny-photos", 5)
    print(f"tiny model in {model_dir}, {len(photos)} photos in {photos[0].parent}")
