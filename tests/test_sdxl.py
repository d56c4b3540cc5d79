"""SDXL on the family seam: both text encoders, pooled embeddings, size/crop time ids, full and LoRA
training, exact resume, exports that diffusers loads and renders (tiny SDXL architecture, CPU)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.data.dataset import DreamBoothData, Example
from dreambooth.errors import DreamBoothError
from dreambooth.models.load import load_components
from dreambooth.models.sdxl import time_ids
from dreambooth.train import train
from test_train import Crash, crash_after_checkpoint


def make_cfg(model, photos, out, preset=None, **sections):
    base = {"preset": preset,
        "model": {"path": str(model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"},
        "data": {"resolution": 32, "min_size": 16},
        "prior": {"enabled": True, "num_class_images": 2, "num_inference_steps": 2, "batch_size": 2},
        "text_encoder": {"train": True},
        "text_encoder_2": {"train": True, "lr": 5e-4},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 4, "batch_size": 1, "output_dir": str(out)},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


def render(pipe, steps=2):
    return pipe("a photo of sks dog", num_inference_steps=steps, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


# ---- the family's pieces against diffusers and by hand -------------------------------------------

def test_encode_prompt_matches_the_pipeline(tiny_sdxl_dir):
    comps = load_components(tiny_sdxl_dir)
    assert comps.family.name == "sdxl" and comps.keep_fp32 == {"vae"}
    ours = comps.family.encode_prompt(comps, ["a photo of sks dog", "a dog"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of sks dog", "a dog"], do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].shape == (2, 77, 32 + 64) and ours["pooled"].shape == (2, 48)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=0)


def _example(width, height):
    return Example(path=None, prompt="p", image=Image.new("RGB", (width, height), (90, 120, 200)))


def test_time_ids_of_a_cropped_and_resized_photo_by_hand():
    """A 30 x 50 (w x h) portrait, trained at 32 px: scaled by 32/30 to 32 x 53, centre crop from row (53-32)//2 = 10.
    A 60 x 40 landscape with a random crop: scaled by 32/40 to 48 x 32; the crop's left edge comes from the
    generator, and a flip mirrors it (48 - 32 - left)."""
    data_cfg = build_config({"data": {"resolution": 32, "min_size": 16}}).data
    data = DreamBoothData([_example(30, 50)], [], data_cfg, seed=0)
    batch = data.batch(0, 1, with_pixels=True)
    assert batch.original_sizes == [(50, 30)] and batch.crops == [(10, 0)] and batch.target_size == (32, 32)
    ids = time_ids(batch.original_sizes, batch.crops, batch.target_size)
    torch.testing.assert_close(ids, torch.tensor([[50.0, 30.0, 10.0, 0.0, 32.0, 32.0]]), rtol=0, atol=0)
    # cached latents (no pixels) give the same geometry
    assert data.batch(0, 1, with_pixels=False).crops == [(10, 0)]

    aug = build_config({"data": {"resolution": 32, "min_size": 16, "center_crop": False, "random_flip": True}}).data
    data = DreamBoothData([_example(60, 40)], [], aug, seed=3)
    seen = set()
    for position in range(8):
        g = data.order.augmentation_generator(position)
        flip = bool(torch.rand((), generator=g) < 0.5)
        torch.randint(0, 1, (1,), generator=g)  # the top offset (32 - 32 + 1 choices)
        left = int(torch.randint(0, 48 - 32 + 1, (1,), generator=g))
        crop = data.batch(position, 1, with_pixels=True).crops[0]
        assert crop == (0, 48 - 32 - left if flip else left)
        seen.add(flip)
    assert seen == {True, False}


def test_text_encoder_2_on_sd_is_refused(tiny_sd_dir, photos, tmp_path):
    with pytest.raises(DreamBoothError, match=r"text_encoder_2.train=true, but .* \(sd\) has no text_encoder_2"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "out"))


def test_vae_path_replaces_the_vae_and_lifts_fp32(tiny_sdxl_dir):
    comps = load_components(tiny_sdxl_dir, vae_path=str(tiny_sdxl_dir / "vae"))
    assert comps.keep_fp32 == set()
    with pytest.raises(DreamBoothError, match="could not load the VAE from"):
        load_components(tiny_sdxl_dir, vae_path=str(tiny_sdxl_dir / "missing"))


# ---- training -------------------------------------------------------------------------------------

# Regenerate after an intentional change to the recipe: run this test and copy "actual" from the failure.
GOLDEN_SDXL = [2.148977756500244, 1.8016517162322998, 1.676991581916809, 1.5732488632202148]


def test_golden_losses(tiny_sdxl_dir, photos, tmp_path):
    result = train(make_cfg(tiny_sdxl_dir, photos, tmp_path / "out"))
    actual = [result.losses[s] for s in range(1, 5)]
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(GOLDEN_SDXL), rtol=1e-4, atol=0,
                               msg=lambda m: f"{m}\nactual: {actual}")



@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_exact(tiny_sdxl_dir, photos, tmp_path, monkeypatch, method):
    """6 steps in one go == 2, a crash, a resume, 4 more: same losses, bitwise-equal exported weights.
    Both text encoders train (LoRA on both for method=lora), with random crops and flips, so the time
    ids change every step, and text_encoder_2 stops at step 3."""
    settings = dict(train={"max_steps": 6, "batch_size": 1, "method": method}, checkpoint={"every_n_steps": 2},
                    data={"random_flip": True, "center_crop": False}, text_encoder_2={"train": True, "stop_step": 3})
    straight = train(make_cfg(tiny_sdxl_dir, photos, tmp_path / "straight", **settings))

    crash_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Crash):
        train(make_cfg(tiny_sdxl_dir, photos, tmp_path / "resumed", **settings))
    monkeypatch.undo()
    settings["train"]["resume"] = True
    resumed = train(make_cfg(tiny_sdxl_dir, photos, tmp_path / "resumed", **settings))
    assert [resumed.losses[s] for s in range(3, 7)] == [straight.losses[s] for s in range(3, 7)]
    files = ["pytorch_lora_weights.safetensors"] if method == "lora" else \
        ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]
    for name in files:
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_caches_do_not_change_sdxl_training(tiny_sdxl_dir, photos, tmp_path):
    """Cached latents and cached prompt + pooled embeddings give the same losses as encoding every step."""
    frozen = dict(text_encoder={"train": False}, text_encoder_2={"train": False, "lr": None})
    cached = train(make_cfg(tiny_sdxl_dir, photos, tmp_path / "a", **frozen))
    live = train(make_cfg(tiny_sdxl_dir, photos, tmp_path / "b", memory={"cache_latents": False, "cache_text_embeddings": False},
                          **frozen))
    assert cached.losses == pytest.approx(live.losses, rel=1e-5)


# ---- end to end: CLI, then diffusers loads and renders ----------------------------------------------

def train_cli(model, photos, out, *extra):
    argv = ["train", "--model.path", str(model), "--concept.instance_dir", str(photos),
            "--concept.instance_prompt", "a photo of sks dog", "--concept.class_prompt", "a photo of a dog",
            "--prior.enabled", "--prior.num_class_images", "2", "--prior.num_inference_steps", "2",
            "--data.resolution", "32", "--data.min_size", "16", "--train.max_steps", "3",
            "--train.output_dir", str(out), "--optim.lr", "1e-3",
            "--validation.prompts", "a photo of sks dog", "--validation.num_images", "1",
            "--validation.num_inference_steps", "2", *extra]
    assert main(argv) == 0


def test_full_end_to_end(tiny_sdxl_dir, photos, tmp_path):
    out = tmp_path / "out"
    train_cli(tiny_sdxl_dir, photos, out, "--text_encoder_2.train")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / part).is_dir(), part
    assert (out / "samples" / "step-000003.png").is_file()
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "stable-diffusion-xl" in card
    assert "text_encoder_2 (lr 0.001)" in card
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = render(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert not np.allclose(image, render(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)))
    assert main(["sample", str(out), "--prompt", "a photo of sks dog", "--num-images", "1", "--steps", "2",
                 "--resolution", "32"]) == 0
    assert (out / "generated" / "dpm++-2-seed0.png").is_file()


def test_lora_end_to_end_with_both_text_encoders(tiny_sdxl_dir, photos, tmp_path):
    out = tmp_path / "out"
    train_cli(tiny_sdxl_dir, photos, out, "--train.method", "lora", "--lora.rank", "4",
              "--text_encoder.train", "--text_encoder_2.train")
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    prefixes = {k.split(".")[0] for k in weights}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    before = render(base)
    base.load_lora_weights(out)
    after = render(base)
    assert np.isfinite(after).all() and not np.allclose(before, after)
    assert main(["sample", str(out), "--prompt", "a photo of sks dog", "--num-images", "1", "--steps", "2",
                 "--resolution", "32", "--scheduler", "euler"]) == 0


@pytest.mark.parametrize("preset, settings", [
    ("low-memory", {}),  # checkpointing, bf16 autocast + weights, int8 moments, fused backward
    ("low-memory", {"train": {"method": "lora"}}),
    (None, {"memory": {"gradient_checkpointing": True, "checkpoint_levels": 1, "channels_last": True}}),
], ids=["low-memory-full", "low-memory-lora", "partial-checkpointing"])
def test_memory_options_train_sdxl(tiny_sdxl_dir, photos, tmp_path, preset, settings):
    """The memory options run on SDXL with both text encoders trained (the VAE stays fp32 under bf16)."""
    out = tmp_path / "out"
    train_settings = {"max_steps": 2, "batch_size": 1, "output_dir": str(out), **settings.pop("train", {})}
    cfg = make_cfg(tiny_sdxl_dir, photos, out, preset=preset, train=train_settings, **settings)
    result = train(cfg)
    assert result.steps == 2 and all(np.isfinite(v) for v in result.losses.values())


def test_the_sdxl_vae_stays_fp32_under_bf16(tiny_sdxl_dir, photos, tmp_path, monkeypatch):
    import dreambooth.run as run_module

    placed = {}
    real = run_module.place

    def record(module, device, dtype):
        placed[type(module).__name__] = dtype
        real(module, device, dtype)

    monkeypatch.setattr(run_module, "place", record)
    out = tmp_path / "out"
    train(make_cfg(tiny_sdxl_dir, photos, out, text_encoder={"train": False}, text_encoder_2={"train": False, "lr": None},
                   memory={"mixed_precision": "bf16"}, train={"max_steps": 1, "batch_size": 1, "output_dir": str(out)}))
    assert placed == {"AutoencoderKL": torch.float32, "CLIPTextModel": torch.bfloat16,
                      "CLIPTextModelWithProjection": torch.bfloat16}


def test_frozen_parts_are_exported_exactly_under_mixed_precision(tiny_sdxl_dir, photos, tmp_path):
    """Under bf16 autocast the frozen text encoders are held in bf16; the export must not save those rounded
    copies but the base's exact weights (the trained UNet is saved in full precision)."""
    out = tmp_path / "out"
    train(make_cfg(tiny_sdxl_dir, photos, out, text_encoder={"train": False}, text_encoder_2={"train": False, "lr": None},
                   memory={"mixed_precision": "bf16"}, train={"max_steps": 1, "batch_size": 1, "output_dir": str(out)}))
    for part in ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        base, exported = load_file(tiny_sdxl_dir / part), load_file(out / part)
        assert base.keys() == exported.keys() and all(torch.equal(base[k], exported[k]) for k in base), part
    assert load_file(out / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == torch.float32
