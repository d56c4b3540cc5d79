"""`dreambooth evaluate --real`: DreamBench's metrics with local DINO / CLIP folders (tiny random stand-ins here)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from dreambooth.cli import main
from dreambooth.errors import DreamBoothError
from dreambooth.evaluation.embedders import ClipEmbedder, DinoEmbedder
from dreambooth.evaluation.prompts import TEMPLATES, read_templates
from dreambooth.evaluation.real import RealEvalSettings, mean_cosine, real_reference, score, without_identifier
from dreambooth.tiny import build_tiny_clip, build_tiny_dino


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return build_tiny_dino(root / "dino"), build_tiny_clip(root / "clip")


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_identical_images_score_one_and_cosine_matches_a_hand_computation(scorers):
    from transformers import AutoImageProcessor, ViTModel

    dino_dir, clip_dir = scorers
    dino = DinoEmbedder(dino_dir)
    a, b = _image(0), _image(1)
    e = dino.embed([a, a.copy(), b])
    assert mean_cosine(e[:1], e[1:2]) == pytest.approx(1.0, abs=1e-6)
    # By hand: the folder's processor, the CLS token of ViTModel, cosine = dot / (|x| |y|).
    model, proc = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval(), AutoImageProcessor.from_pretrained(dino_dir)
    with torch.no_grad():
        cls = model(pixel_values=proc(images=[a, b], return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
    by_hand = float(cls[0] @ cls[1] / (cls[0].norm() * cls[1].norm()))
    assert mean_cosine(e[:1], e[2:]) == pytest.approx(by_hand, abs=1e-5)
    assert abs(by_hand) < 0.9999  # two different images: the check above is not 1.0 == 1.0
    clip = ClipEmbedder(clip_dir)
    image, text = clip.embed([a]), clip.embed_text(["a dog", "a photo of a cat"])
    assert image.shape == (1, 16) and text.shape == (2, 16)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_metrics_from_embeddings_match_their_definitions():
    e = lambda *rows: F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)  # noqa: E731
    real = e([1, 0], [0, 1])
    gen = e([1, 0], [1, 0], [1, 1], [1, -1])  # two prompts x two images
    text = e([1, 0], [0, 1])
    cls = e([1, 1])
    m = score(gen, gen, text, real, real, cls, per_prompt=2)
    r = 2 ** -0.5
    assert m["dino"] == pytest.approx((1 + 0 + 1 + 0 + r + r + r - r) / 8)  # every (generated, real) pair
    assert m["clip_t"] == pytest.approx((1 + 1 + r - r) / 4)  # each image against its own prompt's text
    assert m["pres"] == pytest.approx(r)  # the class image against both photos
    assert m["div"] == pytest.approx(1 - (1 + 0) / 2)  # prompt 1: identical images (0 diversity); prompt 2: orthogonal
    assert real_reference(real, real) == {"dino": pytest.approx(0.0), "clip_i": pytest.approx(0.0)}
    assert real_reference(real[:1], real[:1]) is None
    assert without_identifier("a sks dog in the jungle", "sks") == "a dog in the jungle"


def test_bad_scorer_folders_fail_in_one_line_naming_the_path(scorers, tmp_path):
    dino_dir, clip_dir = scorers
    (tmp_path / "empty").mkdir()
    cases = [(DinoEmbedder, tmp_path / "missing", "no such folder"), (DinoEmbedder, tmp_path / "empty", "no config.json"),
             (DinoEmbedder, clip_dir, "holds a clip model"), (ClipEmbedder, dino_dir, "holds a vit model")]
    for cls, path, what in cases:
        with pytest.raises(DreamBoothError) as err:
            cls(path)
        message = str(err.value)
        assert what in message and str(path) in message and "huggingface-cli download" in message
        assert "\n" not in message
    with pytest.raises(DreamBoothError, match="unknown field"):
        RealEvalSettings(identifier="sks", noun="dog", templates=("a {identifer} {noun}",))
    with pytest.raises(DreamBoothError, match="no such file"):
        read_templates(tmp_path / "prompts.txt")


def test_prompt_lists_are_dreambench_s():
    assert {k: len(v) for k, v in TEMPLATES.items()} == {"object": 25, "live": 25}
    assert TEMPLATES["live"][13] == "a {identifier} {noun} wearing a black top hat and a monocle"
    assert TEMPLATES["object"][-1] == TEMPLATES["live"][-1] == "a cube shaped {identifier} {noun}"


def test_evaluate_real_cli_on_a_trained_output(tiny_sd_dir, scorers, tmp_path, capsys):
    dino_dir, clip_dir = scorers
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _image(i).save(photos / f"{i}.png")
    # A full output as train writes it: the pipeline plus config.yaml, which names photos, identifier and noun.
    out = Path(shutil.copytree(tiny_sd_dir, tmp_path / "out"))
    (out / "config.yaml").write_text(yaml.safe_dump({"concept": {"instance_dir": str(photos),
                                                                 "instance_prompt": "a photo of sks dog"}}))
    status = main(["evaluate", str(out), "--real", "--dino", str(dino_dir), "--clip", str(clip_dir), "--num-prompts", "2",
                   "--num-images", "2", "--class-images", "2", "--steps", "2", "--resolution", "32", "--scheduler", "ddim"])
    assert status == 0
    result = json.loads((out / "evaluation-real.json").read_text())
    assert result["settings"]["prompts"] == [t.format(identifier="sks", noun="dog") for t in TEMPLATES["object"][:2]]
    assert result["settings"]["class_prompt"] == "a dog"
    assert [row["clip_t_text"] for row in result["per_prompt"]] == ["a dog in the jungle", "a dog in the snow"]
    m = result["metrics"]
    for key in ("dino", "clip_i", "clip_t", "pres"):
        assert -1.0 <= m[key] <= 1.0
    assert 0.0 <= m["div"] <= 2.0
    assert 0.0 < result["real_images"]["dino"] < 1.0  # three different photos
    assert Image.open(out / "evaluation-real.png").size == (2 * 32, 3 * 32)  # 2 prompts + the class row, 2 images each
    table = capsys.readouterr().out
    assert "DINO (subject fidelity)" in table and "a sks dog in the jungle" in table
    # Bad input fails in one line before anything is rendered.
    assert main(["evaluate", str(out), "--real", "--dino", str(tmp_path / "nope"), "--clip", str(clip_dir)]) == 2
    assert main(["evaluate", str(tiny_sd_dir), "--real", "--dino", str(dino_dir), "--clip", str(clip_dir)]) == 2
    err = capsys.readouterr().err
    assert "nope: no such folder" in err and "--photos DIR" in err


def test_evaluate_real_loads_a_lora_output_on_its_base(tiny_sd_dir, scorers, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreambooth.evaluation.real import evaluate_real

    dino_dir, clip_dir = scorers
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _image(i).save(photos / f"{i}.png")
    # A LoRA output as train writes it: adapters (random, so they change the images) and config.yaml naming the base.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    out = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    (out / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_sd_dir)}}))
    settings = dict(identifier="sks", noun="dog", templates=TEMPLATES["live"][:1], num_images=2, class_images=2,
                    scheduler="ddim", num_inference_steps=2, resolution=32)
    lora = evaluate_real(out, photos, dino_dir, clip_dir, RealEvalSettings(**settings))
    base = evaluate_real(tiny_sd_dir, photos, dino_dir, clip_dir, RealEvalSettings(**settings), out_dir=tmp_path / "base")
    assert (out / "evaluation-real.json").is_file() and (tmp_path / "base" / "evaluation-real.json").is_file()
    assert lora["metrics"]["dino"] != pytest.approx(base["metrics"]["dino"], abs=1e-6)  # the adapters were applied
    assert lora["real_images"] == base["real_images"]  # the same photos, the same scorers


def test_a_folder_without_an_image_processor_config_gets_the_published_preprocessing(scorers, tmp_path):
    images = [_image(0), _image(1)]
    for cls, folder in zip((DinoEmbedder, ClipEmbedder), scorers):
        bare = Path(shutil.copytree(folder, tmp_path / folder.name))
        (bare / "preprocessor_config.json").unlink()
        # The fixtures save exactly the published preprocessing, so both ways must embed alike.
        assert torch.allclose(cls(bare).embed(images), cls(folder).embed(images), atol=1e-6)
