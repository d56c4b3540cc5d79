"""The tiny DeepFloyd IF-shaped folders load with IFPipeline / IFSuperResolutionPipeline.from_pretrained, tokenize as
T5 does, and render: stage I at 32 px, then stage II upscales that output to 64 px."""

import json

import pytest
import torch
from diffusers import IFPipeline, IFSuperResolutionPipeline

from dreambooth.tiny import T5_TOKENIZER_DIR, build_tiny_if


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    stage1, stage2 = build_tiny_if(root / "tiny-if-1", stage=1), build_tiny_if(root / "tiny-if-2", stage=2)
    index1 = json.loads((stage1 / "model_index.json").read_text())
    index2 = json.loads((stage2 / "model_index.json").read_text())
    assert index1["tokenizer"] == ["transformers", "T5Tokenizer"]
    assert index1["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index2["image_noising_scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index1["safety_checker"] == index1["watermarker"] == [None, None]
    return IFPipeline.from_pretrained(stage1), IFSuperResolutionPipeline.from_pretrained(stage2)


def test_tokenizer_is_t5(pipes):
    tok = pipes[0].tokenizer
    assert type(tok).__name__ == "T5Tokenizer" and len(tok) == pipes[0].text_encoder.config.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # sentinels at the end, <extra_id_0> last
    sks = tok.convert_tokens_to_ids("▁sks")
    assert tok("sks").input_ids == [sks, 1] and tok("a photo of sks dog").input_ids[3] == sks
    words = ["a", "photo", "of", "sks", "dog"]  # caption words are whole pieces, each starting with the metaspace
    assert tok(" ".join(words)).input_ids == [tok.convert_tokens_to_ids("▁" + w) for w in words] + [1]
    assert tok.unk_token_id not in tok("A Zebra, 42!").input_ids  # unseen ASCII is spelled out, not <unk>
    padded = tok("a dog", padding="max_length", max_length=77, truncation=True)  # as IF's encode_prompt
    assert len(padded.input_ids) == 77 and padded.input_ids[3:] == [0] * 74 and sum(padded.attention_mask) == 3
    # the committed folder is what scripts/make_t5_tokenizer.py writes
    assert sorted(p.name for p in T5_TOKENIZER_DIR.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_configs_as_if(pipes):
    stage1, stage2 = pipes
    text = stage1.text_encoder.config
    assert stage1.unet.config.encoder_hid_dim == text.d_model != stage1.unet.config.cross_attention_dim
    assert (stage1.unet.config.in_channels, stage1.unet.config.out_channels) == (3, 6)
    assert (stage2.unet.config.in_channels, stage2.unet.config.out_channels) == (6, 6)
    assert stage1.unet.config.class_embed_type is None and stage2.unet.config.class_embed_type == "timestep"
    for pipe in pipes:
        assert pipe.scheduler.config.variance_type == "learned_range" and pipe.scheduler.config.thresholding
    assert stage2.image_noising_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # one T5 for both stages, so stage I's prompt embeddings can be handed to stage II
    for a, b in zip(stage1.text_encoder.parameters(), stage2.text_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


def test_renders_stage1_then_stage2(pipes):
    stage1, stage2 = pipes
    embeds, negative = stage1.encode_prompt("a photo of sks dog", do_classifier_free_guidance=True, clean_caption=False)
    assert embeds.shape == (1, 77, stage1.text_encoder.config.d_model)
    low = stage1(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, height=32, width=32,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert low.shape == (1, 3, 32, 32) and torch.isfinite(low).all()
    high = stage2(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert high.shape == (1, 3, 64, 64) and torch.isfinite(high).all()
