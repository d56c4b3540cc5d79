"""The loop knows no model family: a made-up family with two text encoders and no VAE (pixel space,
as DeepFloyd IF will be) trains through the unchanged `train()`, and the recipe's files name none."""

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from dreambooth.config import build_config
from dreambooth.models import load
from dreambooth.models.family import Components
from dreambooth.schedule import DDPMSchedule
from dreambooth.train import train

SRC = Path(__file__).resolve().parents[1] / "src" / "dreambooth"


class BagOfWords(torch.nn.Module):
    """A toy text encoder: one embedding per hashed word, (N, 8, dim) out."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed = torch.nn.Embedding(97, dim)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.tensor([[sum(map(ord, w)) % 97 for w in (p.split() + ["<pad>"] * 8)[:8]] for p in prompts])
        return self.embed(ids)


class FakePipeline:
    def __init__(self, modules):
        self.modules = modules

    def save_pretrained(self, folder, safe_serialization=True):
        for name, module in self.modules.items():
            (Path(folder) / name).mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, Path(folder) / name / "weights.safetensors")


class PixelTwoEncoderFamily:
    """Pixel space (no VAE, latent factor 1) and two text encoders whose outputs are concatenated."""

    name = "fake"
    hub_tag = "fake"
    pipeline_class_names = ("FakePipeline",)
    parts = ("unet", "text_encoder", "text_encoder_2", "scheduler")
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_targets = {"unet": ("to_q", "to_v")}
    trains_with_identifier = True
    refuses = {"prior.enabled=True": "no pipeline to make class images with"}
    single_file = None  # no single-file layout: exports write the diffusers format only

    def latent_factor(self, model_dir):
        return 1

    def resolution_step(self, model_dir):
        return 1

    def load(self, model_dir, vae_path=None):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                    layers_per_block=1, cross_attention_dim=12, attention_head_dim=4, norm_num_groups=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        modules = {"unet": unet, "text_encoder": BagOfWords(4), "text_encoder_2": BagOfWords(8)}
        for module in modules.values():
            module.requires_grad_(False)
        return Components(Path(model_dir), self, modules, {}, self.schedule(model_dir), DDPMScheduler(num_train_timesteps=1000))

    def schedule(self, model_dir):
        return DDPMSchedule(DDPMScheduler(num_train_timesteps=1000))

    def encode_prompt(self, comps, prompts):
        return {"states": torch.cat([comps.modules["text_encoder"](prompts), comps.modules["text_encoder_2"](prompts)], -1)}

    def encode_images(self, comps, pixels):
        return pixels, torch.zeros_like(pixels)  # the image is its own (deterministic) latent

    def latents_from(self, comps, mean, std, generator):
        return mean

    def conditioning(self, comps, text, batch, x0, generator):
        return {"encoder_hidden_states": text["states"]}

    def predict(self, comps, noisy, timesteps, cond):
        return comps.denoiser(noisy, timesteps, **cond).sample

    def pipeline(self, comps, scheduler=None):
        return FakePipeline(comps.modules)

    def sample_inputs(self, comps, photos, n):
        return {}

    def prompt_kwargs(self, comps, positive, negative, no_negative_prompt):
        return {}

    def save_lora(self, comps, folder, trained, weight_name):
        raise AssertionError("not used here")

    def usage(self, model, base, lora):
        return [f"fake.load({model!r})"]


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    folder = tmp_path / "fake-model"
    for part in PixelTwoEncoderFamily.parts:
        (folder / part).mkdir(parents=True)
        (folder / part / "weights.safetensors").write_bytes(b"made up")  # for the base-model fingerprint
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FakePipeline"}))
    monkeypatch.setitem(load.FAMILIES, "fake", PixelTwoEncoderFamily())
    return folder


def test_a_pixel_space_family_with_two_text_encoders_trains_through_the_loop(fake_model, photos, tmp_path):
    out = tmp_path / "out"
    cfg = build_config({
        "model": {"path": str(fake_model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog"},
        "data": {"resolution": 32, "min_size": 16, "random_flip": True},  # uncached: encoded every step
        "text_encoder_2": {"train": True, "lr": 1e-2},  # one encoder trains, the other stays frozen
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 3, "batch_size": 2, "output_dir": str(out)},
        "checkpoint": {"every_n_steps": 3},
        "export": {"verify": False},  # its export is not a diffusers folder that anything could load back
    })
    result = train(cfg)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    base = PixelTwoEncoderFamily().load(fake_model)
    exported = {name: load_file(out / name / "weights.safetensors") for name in ("unet", "text_encoder", "text_encoder_2")}
    changed = {name: any(not torch.equal(exported[name][k], base.modules[name].state_dict()[k]) for k in exported[name])
               for name in exported}
    assert changed == {"unet": True, "text_encoder": False, "text_encoder_2": True}
    saved = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder_2"}
    assert "fake.load(" in (out / "README.md").read_text()


def test_the_recipe_names_no_family():
    """train.py, objective.py, export.py, inputs.py, checkpoint.py and monitor.py talk to the family, never about one."""
    family_words = re.compile(r"StableDiffusion|IFPipeline|\bsdxl\b|deepfloyd|\bvae\b|tokenizer|text_encoder_2|"
                              r"encoder_hidden_states|added_cond_kwargs", re.IGNORECASE)
    for name in ("train.py", "objective.py", "export.py", "inputs.py", "checkpoint.py", "monitor.py"):
        tree = ast.parse((SRC / name).read_text())
        for node in ast.walk(tree):  # drop docstrings: prose may explain what a family does
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
        hits = [line.strip() for line in ast.unparse(tree).splitlines() if family_words.search(line)]  # no comments either
        assert not hits, f"{name}: {hits}"
