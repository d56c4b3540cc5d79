"""Every training option runs through the real recipe on the tiny model and gives finite, learning losses."""

import math

import pytest
import torch

from dreambooth.errors import DreamBoothError
from dreambooth.tiny import write_photos
from dreambooth.train import train

from test_train import make_cfg

OPTIONS = {
    "min_snr_v_prediction": dict(objective={"snr_gamma": 5.0, "offset_noise": 0.1}),
    "gradient_checkpointing": dict(memory={"gradient_checkpointing": True}),
    "bf16_autocast": dict(memory={"mixed_precision": "bf16"}),
    "adafactor_cosine": dict(optim={"optimizer": "adafactor", "lr_scheduler": "cosine", "lr": 1e-3}),
    "prodigy": dict(optim={"optimizer": "prodigy", "lr": 1.0}),
    "lion": dict(optim={"optimizer": "lion", "lr": 1e-4}),
    "lora_unet_only": dict(train={"method": "lora"}, text_encoder={"train": False}),
    "no_prior_frozen_text_encoder": dict(prior={"enabled": False}, concept={"class_prompt": None}, text_encoder={"train": False}),
    "random_crop_and_flip": dict(data={"random_flip": True, "center_crop": False}),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_trains(name, tiny_sd_dir, tiny_sd_v_dir, photos, tmp_path):
    model = tiny_sd_v_dir if "v_prediction" in name else tiny_sd_dir
    result = train(make_cfg(model, photos, tmp_path / name, train={"max_steps": 3, **OPTIONS[name].pop("train", {})},
                            **OPTIONS[name]))
    assert sorted(result.losses) == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for v in result.losses.values())


def test_two_concepts_with_captions(tiny_sd_dir, tmp_path):
    dog, cat = tmp_path / "dog", tmp_path / "cat"
    write_photos(dog, 3, seed=1)
    write_photos(cat, 4, seed=2)
    (cat / "photo_00.txt").write_text("a photo of zwx cat sleeping")
    cfg = make_cfg(tiny_sd_dir, dog, tmp_path / "out", train={"max_steps": 2})
    cfg.concept.instance_dir = cfg.concept.instance_prompt = cfg.concept.class_prompt = ""
    from dreambooth.config import ConceptConfig

    cfg.concepts = [ConceptConfig(str(dog), "a photo of sks dog", "a photo of a dog"),
                    ConceptConfig(str(cat), "a photo of zwx cat", "a photo of a cat")]
    cfg.concept.class_prompt = None
    result = train(cfg)
    assert len(result.losses) == 2
    manifests = sorted((tmp_path / "out" / "class_images").glob("*/manifest.jsonl"))
    assert len(manifests) == 2 and "a photo of a cat" in manifests[1].read_text()


def test_adamw8bit_without_cuda_is_a_clear_error(tiny_sd_dir, photos, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DreamBoothError, match="adamw8bit"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "o", optim={"optimizer": "adamw8bit"}))


def test_text_encoder_stop_step_freezes_it(tiny_sd_dir, photos, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "o"
    train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 3}, text_encoder={"stop_step": 0}))
    before = load_file(tiny_sd_dir / "text_encoder" / "model.safetensors")
    after = load_file(out / "text_encoder" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen from step 0: untouched
    unet_before = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    unet_after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)


def test_partial_gradient_checkpointing_marks_high_resolution_blocks_and_trains_the_same(tiny_sd_dir, photos, tmp_path):
    from dreambooth.models.load import load_components
    from dreambooth.models.memory import apply_memory_options

    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "x", memory={"gradient_checkpointing": True, "checkpoint_levels": 1})
    comps = load_components(cfg.model.path, cfg.model.family)
    apply_memory_options(comps, cfg)
    unet = comps.unet
    flags = lambda block: {m.gradient_checkpointing for m in block.modules() if hasattr(m, "gradient_checkpointing")}
    assert flags(unet.down_blocks[0]) == {True} and flags(unet.up_blocks[-1]) == {True}  # highest resolution
    assert all(flags(b) == {False} for b in [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]])

    # checkpointing changes memory, not maths: same losses with none, partial and full
    losses = {}
    for name, memory in {"none": {}, "partial": {"gradient_checkpointing": True, "checkpoint_levels": 1},
                         "full": {"gradient_checkpointing": True}}.items():
        losses[name] = list(train(make_cfg(tiny_sd_dir, photos, tmp_path / name, train={"max_steps": 3}, memory=memory)).losses.values())
    assert losses["partial"] == pytest.approx(losses["none"], rel=1e-5) and losses["full"] == pytest.approx(losses["none"], rel=1e-5)

    with pytest.raises(DreamBoothError, match="needs memory.gradient_checkpointing"):
        make_cfg(tiny_sd_dir, photos, tmp_path / "y", memory={"checkpoint_levels": 1}).validate()
    with pytest.raises(DreamBoothError, match="between 1 and the UNet's"):
        apply_memory_options(comps, make_cfg(tiny_sd_dir, photos, tmp_path / "z", memory={"gradient_checkpointing": True, "checkpoint_levels": 9}))


def test_deepspeed_launch_refuses_what_deepspeed_cannot_run(tiny_sd_dir, photos, tmp_path, monkeypatch):
    # DeepSpeed itself needs CUDA; the start-up check only reads accelerate's distributed type.
    import accelerate
    from accelerate.utils import DistributedType

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(DreamBoothError, match="DeepSpeed .* text_encoder.train=true"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "ds"))
