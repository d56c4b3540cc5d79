"""Shared fixtures: a tiny Stable-Diffusion-architecture model folder and a few photos.

Like diffusers' `get_dummy_components`, every component is a real diffusers/transformers class
built from a small config right after `torch.manual_seed(0)`, then written with `save_pretrained`
so that our loader exercises the same `from_pretrained` path a real SD 1.5 folder takes. The
tokenizer is a real CLIP BPE tokenizer cut down to 2,000 merges (tests/assets/clip_tokenizer,
made by scripts/make_clip_tokenizer.py).
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

ASSETS = Path(__file__).parent / "assets"
RESOLUTION = 32  # pixels; the tiny VAE halves it once -> 16x16 latents


def build_tiny_sd(path: Path, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SD-1.x-shaped pipeline folder (model_index.json, unet/, vae/, ...) to `path`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ASSETS / "clip_tokenizer")
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
    return path


def write_photos(folder: Path, n: int, seed: int = 0, size: int = 40) -> list[Path]:
    """Write `n` small, distinct PNG 'photos' (a coloured square on a gradient) to `folder`."""
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


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture
def model_dir(tiny_sd_dir, tmp_path) -> Path:
    """A private copy of the tiny model, for tests that modify or break the folder."""
    return Path(shutil.copytree(tiny_sd_dir, tmp_path / "tiny-sd"))


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_photos(folder, 5)
    return folder
