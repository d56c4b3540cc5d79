"""A tiny random model of the real Stable Diffusion architecture, and a few synthetic photos.

For smoke runs, tests and CPU benchmarks: every component is a real diffusers/transformers
class built from a small config right after `torch.manual_seed(0)` (as diffusers'
`get_dummy_components`), written with `save_pretrained`, so loading it exercises exactly the
`from_pretrained` path a real SD 1.5 folder takes. The tokenizer is a real CLIP BPE tokenizer cut
down to 2,000 merges (made by scripts/make_clip_tokenizer.py from CLIP's merge list).

    python -m dreambooth.tiny ./tiny-sd ./tiny-photos     # writes both
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


if __name__ == "__main__":
    model_dir = build_tiny_sd(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd")
    photos = write_photos(sys.argv[2] if len(sys.argv) > 2 else "tiny-photos", 5)
    print(f"tiny model in {model_dir}, {len(photos)} photos in {photos[0].parent}")
