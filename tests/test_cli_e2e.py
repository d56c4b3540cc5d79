"""The CLI end to end, as a user runs it: train (full and LoRA), the exact output tree, then render."""

import subprocess
import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from dreambooth.cli import main

FULL_TREE = {
    "README.md", "config.yaml", "model_index.json", ".export.json", "verification.json",
    "checkpoints/latest.json", "checkpoints/step-000004",
    "logs/metrics.jsonl", "samples/step-000002.png", "samples/step-000004.png",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}
LORA_TREE = {
    "README.md", "config.yaml", "pytorch_lora_weights.safetensors", ".export.json", "verification.json",
    "pytorch_lora_weights_kohya.safetensors",  # the same adapters for AUTOMATIC1111 / ComfyUI
    "checkpoints/latest.json", "checkpoints/step-000004",
    "logs/metrics.jsonl", "samples/step-000002.png", "samples/step-000004.png",
}
CHECKPOINT_FILES = {"trainable.safetensors", "optimizer.pt", "training_state.pt", "state.json", "config.yaml"}


def tree(out):
    """Files two levels down (checkpoint folders as one entry), class images and TensorBoard events left out."""
    found = set()
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        if rel.parts[0] == "class_images" or rel.name.startswith("events.out.tfevents"):
            continue
        if rel.parts[0] == "checkpoints" and len(rel.parts) > 2:
            continue
        if p.is_file() or (rel.parts[0] == "checkpoints" and len(rel.parts) == 2):
            found.add(rel.as_posix())
    return found


def train_cli(model, photos, out, *extra):
    argv = ["train", "--model.path", str(model), "--concept.instance_dir", str(photos),
            "--concept.instance_prompt", "a photo of sks dog", "--concept.class_prompt", "a photo of a dog",
            "--prior.enabled", "--prior.num_class_images", "2", "--prior.num_inference_steps", "2",
            "--text_encoder.train", "--data.resolution", "32", "--data.min_size", "16",
            "--train.max_steps", "4", "--train.output_dir", str(out), "--optim.lr", "1e-3",
            "--checkpoint.every_n_steps", "2", "--checkpoint.keep", "1",
            "--validation.prompts", "a photo of sks dog", "--validation.every_n_steps", "2",
            "--validation.num_images", "2", "--validation.num_inference_steps", "2", *extra]
    assert main(argv) == 0


def render(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_full_fine_tune_end_to_end(tiny_sd_dir, photos, tmp_path, capsys):
    out = tmp_path / "out"
    train_cli(tiny_sd_dir, photos, out)
    assert "trained 4 steps" in capsys.readouterr().out
    assert tree(out) == FULL_TREE
    assert {p.name for p in (out / "checkpoints" / "step-000004").iterdir()} == CHECKPOINT_FILES
    assert len(list((out / "class_images" / "0").glob("*.png"))) == 2
    assert len((out / "logs" / "metrics.jsonl").read_text().splitlines()) == 4

    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = render(pipe)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert not np.allclose(image, render(StableDiffusionPipeline.from_pretrained(tiny_sd_dir)))  # training changed it

    assert main(["sample", str(out), "--prompt", "a photo of sks dog", "--num-images", "2", "--steps", "2",
                 "--resolution", "32", "--preset", "overfit"]) == 0
    assert sorted(p.name for p in (out / "generated").iterdir()) == ["ddim-2-grid.png", "ddim-2-seed0.png", "ddim-2-seed1.png"]


def test_lora_end_to_end(tiny_sd_dir, photos, tmp_path):
    out = tmp_path / "out"
    train_cli(tiny_sd_dir, photos, out, "--train.method", "lora", "--lora.rank", "4")
    assert tree(out) == LORA_TREE
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = render(base)
    base.load_lora_weights(out)
    after = render(base)
    assert np.isfinite(after).all() and not np.allclose(before, after)  # the adapters (UNet + text encoder) act

    assert main(["sample", str(out), "--prompt", "a photo of sks dog", "--num-images", "1", "--steps", "2",
                 "--resolution", "32", "--scheduler", "euler"]) == 0
    assert (out / "generated" / "euler-2-seed0.png").is_file()


def test_errors_are_one_line_with_exit_code_2(tiny_sd_dir, tmp_path, capsys):
    code = main(["train", "--model.path", str(tiny_sd_dir), "--concept.instance_dir", str(tmp_path / "missing"),
                 "--concept.instance_prompt", "a photo of sks dog", "--train.output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(tmp_path / "missing") in errors[0]
    assert "Traceback" not in err


def test_unknown_flag_and_console_script(tmp_path):
    # The installed console script runs and teaches: --help lists dotted settings with defaults.
    result = subprocess.run([sys.executable, "-m", "dreambooth.cli", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--optim.lr" in result.stdout and "(default: 5e-06)" in result.stdout and "presets" in result.stdout
    result = subprocess.run([sys.executable, "-m", "dreambooth.cli", "train", "--optim.lrr", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "--optim.lrr" in result.stderr


def test_class_images_command_generates_then_reuses(tiny_sd_dir, tmp_path, capsys):
    argv = ["class-images", "--model.path", str(tiny_sd_dir), "--concept.instance_dir", str(tmp_path),
            "--concept.instance_prompt", "a photo of sks dog", "--concept.class_prompt", "a photo of a dog",
            "--concept.class_dir", str(tmp_path / "dogs"), "--prior.num_class_images", "3",
            "--prior.num_inference_steps", "2", "--data.resolution", "32"]
    assert main(argv) == 0
    files = sorted(p.name for p in (tmp_path / "dogs").glob("*.png"))
    assert len(files) == 3 and "3 class images" in capsys.readouterr().out
    assert main(argv) == 0  # second run reuses: same files
    assert sorted(p.name for p in (tmp_path / "dogs").glob("*.png")) == files
