"""Write the config folders that let a single-file checkpoint of a public base model load offline.

diffusers' `from_single_file` needs each part's diffusers config; without a local folder it
downloads them from the Hub. These folders hold only configs (no weights): model_index.json,
unet/, vae/, text_encoder(_2)/, scheduler/, and tokenizer(_2)/tokenizer_config.json, whose
vocabulary is the one shipped copy in assets/clip_vocab. The architectures are tiny.py's
published configs (sd15, sd2, sdxl), the same ones the GPU benchmarks build.

    python scripts/make_single_file_configs.py      # -> src/dreambooth/assets/single_file/
"""

import json
import shutil
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig

from dreambooth.tiny import ARCHITECTURES, SDXL_ARCHITECTURES

OUT = Path(__file__).resolve().parent.parent / "src" / "dreambooth" / "assets" / "single_file"
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)


def tokenizer(folder: Path, pad: str) -> None:
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}, indent=2) + "\n")


def write(name: str, spec: dict, pipeline: str, scheduler, text_parts: dict, extra_index: dict) -> None:
    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    downsample = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    with init_empty_weights():  # configs only: no weights are allocated
        UNet2DConditionModel(sample_size=spec["resolution"] // downsample, in_channels=4, out_channels=4,
                             **spec["unet"]).save_config(out / "unet")
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=spec["resolution"],
                      **spec["vae"]).save_config(out / "vae")
    scheduler.save_config(out / "scheduler")
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", type(scheduler).__name__],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], **extra_index}
    for part, (cls, text, pad) in text_parts.items():
        config = CLIPTextConfig(**{**CLIP_IDS, "pad_token_id": 0 if pad == "!" else 49407, **text})
        config.architectures = [cls]
        config.save_pretrained(out / part)
        tok = "tokenizer" + part.removeprefix("text_encoder")
        tokenizer(out / tok, pad)
        index[part] = ["transformers", cls]
        index[tok] = ["transformers", "CLIPTokenizer"]
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    print("wrote", out)


def main() -> None:
    sd_index = {"safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
                "requires_safety_checker": False}
    sd15, sd2 = ARCHITECTURES["sd15"], ARCHITECTURES["sd2"]
    write("sd15", sd15, "StableDiffusionPipeline",
          PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False),
          {"text_encoder": ("CLIPTextModel", {**sd15["text"], "projection_dim": 768}, "<|endoftext|>")}, sd_index)
    sd2_text = {"text_encoder": ("CLIPTextModel", {**sd2["text"], "projection_dim": 512}, "!")}
    write("sd2-768-v", sd2, "StableDiffusionPipeline",
          DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"),
          sd2_text, sd_index)
    write("sd2-512", {**sd2, "resolution": 512, "prediction_type": "epsilon"}, "StableDiffusionPipeline",
          DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False), sd2_text, sd_index)
    xl = SDXL_ARCHITECTURES["sdxl"]
    write("sdxl-base", xl, "StableDiffusionXLPipeline",
          EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", interpolation_type="linear"),
          {"text_encoder": ("CLIPTextModel", xl["text"], "<|endoftext|>"),
           "text_encoder_2": ("CLIPTextModelWithProjection", xl["text_2"], "!")},
          {"force_zeros_for_empty_prompt": True, "feature_extractor": [None, None], "image_encoder": [None, None]})


if __name__ == "__main__":
    main()
