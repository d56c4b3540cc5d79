"""The tiny SDXL-shaped folder loads with StableDiffusionXLPipeline.from_pretrained, pads as SDXL does, and renders."""

import json

import pytest
from diffusers import StableDiffusionXLPipeline

from dreambooth.tiny import build_tiny_sdxl


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    index = json.loads((path / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= set(index)
    return StableDiffusionXLPipeline.from_pretrained(path)


def test_tokenizers_pad_as_sdxl(pipe):
    # tokenizer pads with its end token (as CLIP does); tokenizer_2 with "!" (as SDXL's, after from_pretrained)
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer_2.pad_token_id == pipe.tokenizer_2.convert_tokens_to_ids("!") != pipe.tokenizer_2.eos_token_id
    ids = pipe.tokenizer_2("a dog", padding="max_length", max_length=8).input_ids
    assert ids[-1] == pipe.tokenizer_2.convert_tokens_to_ids("!")


def test_conditioning_shapes_agree(pipe):
    # cross attention sees both encoders' hidden states side by side; add_embedding gets 6 time ids + text_encoder_2's pool
    unet = pipe.unet.config
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pooled_dim
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.config.force_zeros_for_empty_prompt


def test_renders_32px(pipe):
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
