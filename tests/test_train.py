"""The recipe end to end on the tiny model: golden losses, exact resume, caches, refusals."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.config import build_config
from dreambooth.errors import DreamBoothError
from dreambooth.tiny import write_photos
from dreambooth.train import train


def make_cfg(base_model, photos, out, **sections):
    """A 32-px config with prior preservation and text-encoder training; `sections` override."""
    base = {
        "model": {"path": str(base_model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"},
        "data": {"resolution": 32, "min_size": 16},
        "prior": {"enabled": True, "num_class_images": 3, "num_inference_steps": 2, "batch_size": 3},
        "text_encoder": {"train": True},
        "optim": {"lr": 1e-3, "lr_scheduler": "linear", "warmup_steps": 2},
        "train": {"max_steps": 4, "batch_size": 2, "output_dir": str(out)},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


# Regenerate after an intentional change to the recipe: run this test and copy "actual" from the failure.
GOLDEN_FULL = [2.3526628017425537, 2.3353796005249023, 2.06844425201416, 1.7986502647399902]


def test_golden_losses(tiny_sd_dir, photos, tmp_path):
    result = train(make_cfg(tiny_sd_dir, photos, tmp_path / "out"))
    actual = [result.losses[s] for s in range(1, 5)]
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(GOLDEN_FULL), rtol=1e-4, atol=0,
                               msg=lambda m: f"{m}\nactual: {actual}")


class Crash(Exception):
    pass


def crash_after_checkpoint(monkeypatch, at_step):
    """Make the run die right after it writes the checkpoint for `at_step`, as a killed process would."""
    real = ckpt.save_checkpoint

    def save_then_crash(output_dir, step, *args, **kwargs):
        path = real(output_dir, step, *args, **kwargs)
        if step == at_step:
            raise Crash
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)


def straight_and_resumed(model, photos, tmp_path, monkeypatch, settings: dict, crash_at: int):
    """Train `settings` in one go (tmp_path/a), and again (tmp_path/b) with a crash right after the
    checkpoint at `crash_at` and a resume; the second reuses the first's class images. Returns both results."""
    straight = train(make_cfg(model, photos, tmp_path / "a", **settings))
    out = tmp_path / "b"
    if (tmp_path / "a" / "class_images").is_dir():
        shutil.copytree(tmp_path / "a" / "class_images", out / "class_images")
    crash_after_checkpoint(monkeypatch, at_step=crash_at)
    with pytest.raises(Crash):
        train(make_cfg(model, photos, out, **settings))
    monkeypatch.undo()
    resumed = train(make_cfg(model, photos, out, **{**settings, "train": {**settings["train"], "resume": True}}))
    return straight, resumed


def _final_weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(out / "pytorch_lora_weights.safetensors")
    return {**{f"unet.{k}": v for k, v in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").items()},
            **{f"te.{k}": v for k, v in load_file(out / "text_encoder" / "model.safetensors").items()}}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_exact(tiny_sd_dir, photos, tmp_path, monkeypatch, method):
    """6 steps in one go == 2 steps, a crash, a resume, 4 more: same per-step losses and bitwise-equal weights.

    Covers everything a resume must restore: weights, AdamW state, a warmup+linear LR schedule, the
    noise/timestep generator, the global RNG (LoRA dropout), random flips and crops (no latent
    cache), class images, text-encoder training with a stop step, and gradient accumulation.
    """
    settings = dict(
        train={"max_steps": 6, "gradient_accumulation_steps": 2, "method": method},
        checkpoint={"every_n_steps": 2},
        data={"random_flip": True, "center_crop": False},
        lora={"dropout": 0.1},
        text_encoder={"stop_step": 3},
    )
    continuous = train(make_cfg(tiny_sd_dir, photos, tmp_path / "a", **settings))

    out = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "class_images", out / "class_images")  # same class images, no regeneration
    crash_after_checkpoint(monkeypatch, at_step=2)
    with pytest.raises(Crash):
        train(make_cfg(tiny_sd_dir, photos, out, **settings))
    monkeypatch.undo()
    resumed = train(make_cfg(tiny_sd_dir, photos, out, **{**settings, "train": {**settings["train"], "resume": True}}))

    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert [resumed.losses[s] for s in range(3, 7)] == [continuous.losses[s] for s in range(3, 7)]  # bitwise
    a, b = _final_weights(tmp_path / "a", method), _final_weights(out, method)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_latent_and_text_caches_do_not_change_training(tiny_sd_dir, photos, tmp_path):
    """Cached VAE posteriors and prompt embeddings give exactly the losses of encoding every step."""
    common = dict(text_encoder={"train": False}, train={"max_steps": 3})
    cached = train(make_cfg(tiny_sd_dir, photos, tmp_path / "c", memory={"cache_latents": True, "cache_text_embeddings": True}, **common))
    shutil.copytree(tmp_path / "c" / "class_images", tmp_path / "u" / "class_images")
    uncached = train(make_cfg(tiny_sd_dir, photos, tmp_path / "u", memory={"cache_latents": False, "cache_text_embeddings": False}, **common))
    torch.testing.assert_close(torch.tensor(list(cached.losses.values())), torch.tensor(list(uncached.losses.values())),
                               rtol=1e-5, atol=1e-6)


def test_prior_loss_weight_zero_equals_no_class_term(tiny_sd_dir, photos, tmp_path):
    """With lambda = 0 the class term is absent, bit for bit: the class rows are still in every batch, but
    nothing in them (pixels, prompt) reaches a loss or a trained weight.

    Why two runs with different class rows rather than one without class images: a step's latent samples,
    noise and timesteps are drawn for the whole batch at once, class rows after subject rows, so dropping the
    class rows changes the subject rows' draws (the timesteps come after all the noise in the stream). No
    setting avoids that short of another random layout, which would change every golden loss. The
    normalisation is no obstacle (`objective.combine` divides by the subject rows alone). So the run without
    a class term is made by keeping the class rows and replacing everything in them: other images and another
    prompt, as many images (the count sets the data order). Both runs train the UNet and the text encoder
    (which sees the class prompts), for four steps. A weight that stopped being applied would let the class
    rows in and the runs differ; lambda = 1 on the same rows is the control that they are in the batch.
    """
    def run(name, lam, class_prompt, seed):
        class_dir = tmp_path / f"class-{seed}"
        if not class_dir.is_dir():
            write_photos(class_dir, 3, seed=seed)
        out = tmp_path / name
        result = train(make_cfg(tiny_sd_dir, photos, out, prior={"loss_weight": lam},
                                concept={"class_prompt": class_prompt, "class_dir": str(class_dir),
                                         "class_images_user_supplied": True}))
        return result, _final_weights(out, "full")

    dog, dog_weights = run("dog", 0.0, "a photo of a dog", seed=1)
    cat, cat_weights = run("cat", 0.0, "a photo of a cat", seed=2)
    assert sorted(dog.losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in dog.losses.values())
    assert dog.losses == cat.losses  # bitwise
    assert dog_weights.keys() == cat_weights.keys() and any(k.startswith("te.") for k in dog_weights)
    for name in dog_weights:
        assert torch.equal(dog_weights[name], cat_weights[name]), name
    weighted, _ = run("cat-weighted", 1.0, "a photo of a cat", seed=2)
    assert weighted.losses[1] != cat.losses[1]  # the class rows are there, and lambda is what keeps them out


def test_resume_refuses_other_model_or_settings(tiny_sd_dir, photos, tmp_path, model_dir):
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 2}, checkpoint={"every_n_steps": 2}))
    # More steps with the same settings: allowed.
    cfg = make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 3, "resume": True}, checkpoint={"every_n_steps": 2})
    assert sorted(train(cfg).losses) == [3]
    # Another base model (same architecture, other weights).
    unet_file = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet_file)
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in weights.items()}, unet_file)
    with pytest.raises(DreamBoothError, match="base model's weights differ"):
        train(make_cfg(model_dir, photos, out, train={"max_steps": 5, "resume": True}))
    with pytest.raises(DreamBoothError, match=r"optim\.lr changed"):
        train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 5, "resume": True}, optim={"lr": 5e-4}))
    # Starting over in a folder with checkpoints is refused rather than silently mixing runs.
    with pytest.raises(DreamBoothError, match="train.resume"):
        train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 5}))


def test_resume_without_checkpoint_is_an_error(tiny_sd_dir, photos, tmp_path):
    with pytest.raises(DreamBoothError, match="has no checkpoint"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "new", train={"resume": True}))


def test_bad_photo_fails_before_any_work(tiny_sd_dir, photos, tmp_path):
    (photos / "photo_02.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(DreamBoothError, match="photo_02.png"):
        train(make_cfg(tiny_sd_dir, photos, out))
    assert not (out / "class_images").exists()  # no class image was generated


@pytest.mark.parametrize("breakage, message", [
    ("no_index", "no model_index.json"),
    ("no_unet", "missing model part.*unet"),
    ("corrupt_vae", "could not load the vae"),
    ("not_a_folder", "model folder not found"),
])
def test_bad_model_folder_names_path_and_part(model_dir, photos, tmp_path, breakage, message):
    if breakage == "no_index":
        (model_dir / "model_index.json").unlink()
    elif breakage == "no_unet":
        shutil.rmtree(model_dir / "unet")
    elif breakage == "corrupt_vae":
        (model_dir / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    else:
        model_dir = tmp_path / "nope"
    with pytest.raises(DreamBoothError, match=message) as info:
        train(make_cfg(model_dir, photos, tmp_path / "out"))
    assert str(model_dir) in str(info.value)
