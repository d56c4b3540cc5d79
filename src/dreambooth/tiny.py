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


def build_tiny_sd(path: str | Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD-1.x-shaped pipeline folder (model_index.json, unet/, vae/, ...) to `path`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


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
