import json

from diffusers import StableDiffusionPipeline


def test_tiny_model_folder_loads_and_renders(tiny_sd_dir):
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
