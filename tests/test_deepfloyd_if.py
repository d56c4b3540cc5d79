"""DeepFloyd IF on the family seam: stage I (text -> 32 px here) and stage II (the upscaler), full and
LoRA, in pixel space with a T5 text encoder (tiny architectures and a locally built T5 tokenizer)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
from PIL import Image
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.config import build_config
from dreambooth.errors import DreamBoothError
from dreambooth.models.deepfloyd_if import LOW_RES_FACTOR, degrade
from dreambooth.models.load import load_components
from dreambooth.train import train
from test_train import Crash, crash_after_checkpoint


def make_cfg(model, photos, out, resolution, preset=None, **sections):
    base = {
        "preset": preset,
        "model": {"path": str(model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog"},
        "data": {"resolution": resolution, "min_size": 16},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 4, "batch_size": 2, "output_dir": str(out)},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


# ---- the family's pieces, by hand --------------------------------------------------------------

def test_stage_i_trains_only_the_epsilon_half(tiny_if_dir):
    """The UNet outputs epsilon and variance (6 channels); the loss sees the epsilon half, so the variance
    rows of the output convolution get no gradient and the epsilon rows do."""
    comps = load_components(tiny_if_dir)
    assert comps.family.name == "if" and comps.family.latent_factor(tiny_if_dir) == 1
    comps.unet.requires_grad_(True)
    text = comps.family.encode_prompt(comps, ["a photo of sks dog"])
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 3, 32, 32, generator=g)
    cond = comps.family.conditioning(comps, text, None, noisy, g)
    prediction = comps.family.predict(comps, noisy, torch.tensor([500]), cond)
    assert prediction.shape == (1, 3, 32, 32)
    prediction.pow(2).mean().backward()
    grad = comps.unet.conv_out.weight.grad  # (6, C, 3, 3): rows 0-2 epsilon, 3-5 variance
    assert grad[3:].abs().sum() == 0 and grad[:3].abs().sum() > 0


def test_prompts_are_cleaned_and_padded_as_the_pipeline_does(tiny_if_dir):
    comps = load_components(tiny_if_dir)
    ours = comps.family.encode_prompt(comps, ["A Photo of SKS Dog "])["prompt_embeds"]
    pipe = IFPipeline.from_pretrained(tiny_if_dir)
    theirs, _ = pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False, clean_caption=False)
    assert ours.shape == (1, 77, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _cosine_abar(t: int, steps: int = 1000) -> float:
    """alpha_bar of diffusers' squaredcos_cap_v2 schedule at step t, from its betas (Nichol & Dhariwal 2021)."""
    f = lambda s: math.cos((s / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = 1.0
    for i in range(t + 1):
        abar *= 1 - min(1 - f(i + 1) / f(i), 0.999)
    return abar


def test_stage_ii_conditioning_by_hand(tiny_if2_dir):
    """The upscaler's input: x0 averaged over 4 x 4 blocks, upscaled bilinearly (corners aligned), noised at a
    level drawn from the step's generator, level first, then the noise."""
    comps = load_components(tiny_if2_dir)
    noising = comps.extras["image_noising_scheduler"]
    x0 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    image, levels = degrade(x0, noising, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    want_levels = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(2, 3, 64, 64, generator=g)
    low = x0.reshape(2, 3, 64 // LOW_RES_FACTOR, LOW_RES_FACTOR, 64 // LOW_RES_FACTOR, LOW_RES_FACTOR).mean((3, 5))
    up = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=True)
    abar = torch.tensor([_cosine_abar(int(t)) for t in want_levels], dtype=torch.float64).view(-1, 1, 1, 1)
    by_hand = (abar.sqrt() * up.double() + (1 - abar).sqrt() * noise.double()).float()
    assert torch.equal(levels, want_levels)
    torch.testing.assert_close(image, by_hand, rtol=1e-4, atol=1e-5)
    # and the UNet sees [noisy target, conditioning image] with the level as its class label
    text = comps.family.encode_prompt(comps, ["a dog", "a dog"])
    cond = comps.family.conditioning(comps, text, None, x0, torch.Generator().manual_seed(7))
    assert torch.equal(cond["class_labels"], want_levels) and torch.equal(cond["image"], image)
    assert comps.family.predict(comps, x0, torch.tensor([3, 900]), cond).shape == (2, 3, 64, 64)


def test_prior_preservation_on_stage_ii_is_refused(tiny_if2_dir, photos, tmp_path):
    cfg = make_cfg(tiny_if2_dir, photos, tmp_path / "out", 64, prior={"enabled": True},
                   concept={"class_prompt": "a photo of a dog"})
    with pytest.raises(DreamBoothError, match=r"prior.enabled=true cannot be used with .* \(if-ii\)"):
        train(cfg)


def test_distilled_samples_on_stage_ii_are_refused(tiny_if2_dir, photos, tmp_path):
    """Knowledge preservation starts from the base's own sample, which has no low-resolution photo to condition on."""
    cfg = make_cfg(tiny_if2_dir, photos, tmp_path / "out", 64, prior={"preserve_weight": 1.0, "preserve_prompts": ["a cat"]})
    with pytest.raises(DreamBoothError, match=r"prior.distills=true cannot be used with .* \(if-ii\)"):
        train(cfg)


# ---- training: golden losses and exact resume ------------------------------------------------------

# Regenerate after an intentional change to the recipe: run the test and copy "actual" from the failure.
GOLDEN = {
    "if": [1.1165804862976074, 1.077354907989502, 0.9089654684066772, 0.8047088384628296],
    "if-ii": [1.087815761566162, 0.9607774615287781, 0.9776334762573242, 0.8437690734863281],  # prompts without "sks"
}


@pytest.mark.parametrize("stage", ["if", "if-ii"])
def test_golden_losses(tiny_if_dir, tiny_if2_dir, photos, tmp_path, stage):
    model, resolution = (tiny_if_dir, 32) if stage == "if" else (tiny_if2_dir, 64)
    result = train(make_cfg(model, photos, tmp_path / "out", resolution, text_encoder={"train": True}))
    actual = [result.losses[s] for s in range(1, 5)]
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(GOLDEN[stage]), rtol=1e-4, atol=0,
                               msg=lambda m: f"{m}\nactual: {actual}")



@pytest.mark.parametrize("stage, method", [("if", "lora"), ("if-ii", "full")])
def test_resume_is_exact(tiny_if_dir, tiny_if2_dir, photos, tmp_path, monkeypatch, stage, method):
    """6 steps == 2, a crash, a resume, 4 more. Stage II draws its augmentation level and noise from the step's
    generator, so an exact resume also shows that the conditioning's randomness is restored."""
    model, resolution = (tiny_if_dir, 32) if stage == "if" else (tiny_if2_dir, 64)
    settings = dict(train={"max_steps": 6, "batch_size": 1, "method": method}, checkpoint={"every_n_steps": 2},
                    data={"random_flip": True}, text_encoder={"train": True})
    straight = train(make_cfg(model, photos, tmp_path / "straight", resolution, **settings))
    crash_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Crash):
        train(make_cfg(model, photos, tmp_path / "resumed", resolution, **settings))
    monkeypatch.undo()
    settings["train"]["resume"] = True
    resumed = train(make_cfg(model, photos, tmp_path / "resumed", resolution, **settings))
    assert [resumed.losses[s] for s in range(3, 7)] == [straight.losses[s] for s in range(3, 7)]
    name = "pytorch_lora_weights.safetensors" if method == "lora" else "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the four recipes end to end: CLI, then diffusers loads and renders ------------------------------

def cli(model, photos, out, resolution, *extra):
    argv = ["train", "--model.path", str(model), "--concept.instance_dir", str(photos),
            "--concept.instance_prompt", "a photo of sks dog", "--data.resolution", str(resolution),
            "--data.min_size", "16", "--train.max_steps", "2", "--train.output_dir", str(out),
            "--validation.prompts", "a photo of sks dog", "--validation.num_images", "1",
            "--validation.num_inference_steps", "2", *extra]
    assert main(argv) == 0


def stage_i_image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, output_type="pt", height=32, width=32,
                generator=torch.Generator().manual_seed(0)).images


def stage_ii_image(pipe, low):
    return pipe("a dog", image=low, num_inference_steps=2, output_type="pt", height=64, width=64,
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("recipe", ["if-i-lora", "if-i-full"])
def test_stage_i_recipes_end_to_end(tiny_if_dir, tiny_if2_dir, photos, tmp_path, recipe):
    out = tmp_path / "out"
    extra = ["--preset", recipe, "--optim.lr", "1e-3", "--train.batch_size", "1", "--optim.optimizer", "adamw"]
    if recipe == "if-i-lora":
        extra += ["--prior.enabled", "--concept.class_prompt", "a photo of a dog", "--prior.num_class_images", "2",
                  "--prior.num_inference_steps", "2"]  # class images from IFPipeline at stage I's resolution
    cli(tiny_if_dir, photos, out, 32, *extra)
    assert (out / "samples" / "step-000002.png").is_file()
    base = IFPipeline.from_pretrained(tiny_if_dir)
    if recipe == "if-i-lora":
        assert len(list((out / "class_images" / "0").glob("*.png"))) == 2
        before = stage_i_image(base)
        base.load_lora_weights(out)
        base.scheduler = DDPMScheduler.from_config(base.scheduler.config, variance_type="fixed_small")
        after = stage_i_image(base)
        assert 'variance_type="fixed_small"' in (out / "README.md").read_text()
        # the cascade: stage I (the LoRA output, fixed variance applied) then the IF-II base upscaling it
        assert main(["sample", str(out), "--prompt", "a photo of sks dog", "--upscale", str(tiny_if2_dir),
                     "--upscale-prompt", "a photo of dog", "--num-images", "2", "--steps", "2", "--resolution", "32",
                     "--scheduler", "ddpm"]) == 0
        generated = out / "generated"
        assert Image.open(generated / "ddpm-2-seed0.png").size == (64, 64)
        assert Image.open(generated / "ddpm-2-stage1-grid.png").size[1] == 32
        assert Image.open(generated / "ddpm-2-stage2-grid.png").size[1] == 64
        # and the optional third stage, an x4 latent upscaler (StableDiffusionUpscalePipeline): 64 -> 256 px
        from dreambooth.tiny import build_tiny_x4_upscaler

        x4 = build_tiny_x4_upscaler(tmp_path / "x4")
        assert main(["sample", str(out), "--prompt", "a photo of sks dog", "--upscale", str(tiny_if2_dir), "--upscale", str(x4),
                     "--upscale-prompt", "a photo of dog", "--num-images", "1", "--steps", "2", "--resolution", "32",
                     "--scheduler", "ddim", "--out-dir", str(tmp_path / "three")]) == 0
        assert Image.open(tmp_path / "three" / "ddim-2-seed0.png").size == (256, 256)
        assert Image.open(tmp_path / "three" / "ddim-2-stage3-grid.png").size[1] == 256
    else:  # the preset leaves the untrained T5 out of the folder (the seed's --skip_save_text_encoder)
        assert not (out / "text_encoder").exists()
        pipe = IFPipeline.from_pretrained(out, text_encoder=base.text_encoder)
        assert pipe.scheduler.config.variance_type == "fixed_small"
        before, after = stage_i_image(base), stage_i_image(pipe)
    assert after.shape == (1, 3, 32, 32) and torch.isfinite(after).all() and not torch.allclose(before, after)


@pytest.mark.parametrize("recipe", ["if-ii-lora", "if-ii-full"])
def test_stage_ii_recipes_end_to_end(tiny_if2_dir, photos, tmp_path, recipe):
    out = tmp_path / "out"
    cli(tiny_if2_dir, photos, out, 64, "--preset", recipe, "--optim.lr", "1e-3", "--train.batch_size", "1",
        "--train.gradient_accumulation_steps", "1")
    assert (out / "samples" / "step-000002.png").is_file()  # validation upscaled the shrunk instance photos
    low = torch.from_numpy(np.asarray(Image.open(next(photos.glob("*.png"))).convert("RGB").resize((16, 16)),
                                      dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    base = IFSuperResolutionPipeline.from_pretrained(tiny_if2_dir)
    before = stage_ii_image(base, low)
    if recipe == "if-ii-lora":
        base.load_lora_weights(out)
        base.scheduler = DDPMScheduler.from_config(base.scheduler.config, variance_type="fixed_small")
        after = stage_ii_image(base, low)
    else:
        pipe = IFSuperResolutionPipeline.from_pretrained(out)
        assert pipe.scheduler.config.variance_type == "fixed_small"
        after = stage_ii_image(pipe, low)
    assert after.shape == (1, 3, 64, 64) and torch.isfinite(after).all() and not torch.allclose(before, after)


def test_stage_ii_trains_on_prompts_without_the_identifier(tiny_if2_dir, photos, tmp_path, monkeypatch):
    """diffusers' guide: the upscaler's prompt drops the identifier ("a sks dog" -> "a dog")."""
    from dreambooth.models.deepfloyd_if import IFStageIIFamily

    seen = []
    real = IFStageIIFamily.encode_prompt
    monkeypatch.setattr(IFStageIIFamily, "encode_prompt", lambda self, comps, prompts: seen.extend(prompts) or real(self, comps, prompts))
    train(make_cfg(tiny_if2_dir, photos, tmp_path / "a", 64, train={"max_steps": 1, "batch_size": 1, "output_dir": str(tmp_path / "a")}))
    assert set(seen) - {""} == {"a photo of dog"}  # ("" is the negative prompt, cached for validation)
    seen.clear()
    train(make_cfg(tiny_if2_dir, photos, tmp_path / "b", 64, concept={"instance_prompt": "a sks dog in a bucket", "identifier": "sks"},
                   train={"max_steps": 1, "batch_size": 1, "output_dir": str(tmp_path / "b")}))
    assert set(seen) - {""} == {"a dog in a bucket"}
