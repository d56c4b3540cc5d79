"""The miniature world: deterministic renders and captions, held-out subjects and backgrounds."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth.miniworld import world


def _trained_and_exported(result, base, steps: int) -> None:
    """`steps` finite losses, one a step; the export passed its verification; and its denoiser differs from
    the base's (what "fine-tunes" and "trains" promise: a model that learnt, written where it can be used)."""
    from dreambooth.interop.exports import REPORT

    assert result.steps == steps and sorted(result.losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in result.losses.values()), result.losses
    out = result.output_dir
    assert json.loads((out / REPORT).read_text())["passed"]
    name = "unet/diffusion_pytorch_model.safetensors"
    trained, before = load_file(out / name), load_file(base / name)
    assert trained.keys() == before.keys()
    changed = [k for k in trained if not torch.equal(trained[k].float(), before[k].float())]
    assert changed, f"no weight of {out / name} differs from the base's"


def test_world_example_is_deterministic():
    for seed in (0, 7, 123):
        a_img, a_cap, a_scene = world.world_example(seed)
        b_img, b_cap, b_scene = world.world_example(seed)
        assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
        assert (a_cap, a_scene) == (b_cap, b_scene)
        assert a_img.size == (32, 32) and a_img.mode == "RGB"


def test_world_has_168_combinations_and_never_a_subject():
    assert len(world.world_combinations()) == 168
    scenes = [world.world_example(s)[2] for s in range(300)]
    assert all(sc.subject is None for sc in scenes)
    assert all(sc.colour != sc.background for sc in scenes)
    assert {sc.shape for sc in scenes} == set(world.SHAPES)
    assert {sc.colour for sc in scenes} == set(world.COLOURS)
    assert {sc.background for sc in scenes} == set(world.BACKGROUNDS)


def test_captions_contain_the_class_noun_and_drop_attributes():
    caps = [world.world_example(s) for s in range(2000)]
    nonempty = [(c, sc) for _, c, sc in caps if c]
    empty_share = 1 - len(nonempty) / len(caps)
    assert 0.07 < empty_share < 0.13
    assert all(" toy" in c and c.startswith("a photo of ") for c, _ in nonempty)
    shape_named = np.mean([sc.shape in c for c, sc in nonempty])
    assert 0.58 < shape_named < 0.72  # kept with p = 0.65
    assert "a photo of a toy" in {c for c, _ in nonempty}
    assert world.describe("circle", "red", "blue") == "a photo of a red circle toy on a blue background"
    assert world.describe(colour="orange") == "a photo of an orange toy"


def test_subjects_are_novel_and_backgrounds_held_out():
    assert len(world.SUBJECTS) >= 4
    for name, s in world.SUBJECTS.items():
        assert s.shape not in world.SHAPES
        assert not set(s.instance_backgrounds) & set(s.heldout_backgrounds)
        assert set(s.instance_backgrounds) | set(s.heldout_backgrounds) <= set(world.BACKGROUNDS)
        scenes = world.instance_scenes(name)
        assert len(scenes) == 5
        assert {sc.background for sc in scenes} == set(s.instance_backgrounds)
        assert all(sc.subject == name for sc in scenes)
        prompts = world.recontext_prompts(name)
        assert set(prompts) == set(s.heldout_backgrounds)
        assert all(p.startswith("a photo of sks toy on a") for p in prompts.values())


def test_instance_images_differ_and_are_written(tmp_path):
    for name in world.SUBJECTS:
        arrays = [np.asarray(im, dtype=np.int16) for im in world.instance_images(name)]
        for i in range(len(arrays)):
            for j in range(i + 1, len(arrays)):
                assert np.abs(arrays[i] - arrays[j]).mean() > 1.0
    paths = world.write_instance_images("banded_heart", tmp_path / "heart")
    assert [p.name for p in paths] == [f"banded_heart_{i:02d}.png" for i in range(5)]
    again = world.write_instance_images("banded_heart", tmp_path / "again")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert not list((tmp_path / "heart").glob("*.txt"))


def test_instance_captions_name_each_photos_background(tmp_path):
    """Captioned photos train with their caption (the trainer's per-image caption files); written again without
    captions, the folder trains with the concept's prompt again."""
    from dreambooth.config import ConceptConfig, DataConfig
    from dreambooth.data.dataset import subject_examples

    folder = tmp_path / "moon"
    world.write_instance_images("split_moon", folder, captions=True)
    concept = ConceptConfig(instance_dir=str(folder), instance_prompt=world.instance_prompt())
    prompts = [e.prompt for e in subject_examples([concept], DataConfig(resolution=world.SIZE))]
    assert prompts == [world.describe(identifier="sks", background=s.background) for s in world.instance_scenes("split_moon")]
    assert set(prompts) == {f"a photo of sks toy on a {bg} background" for bg in world.SUBJECTS["split_moon"].instance_backgrounds}
    world.write_instance_images("split_moon", folder)
    assert {e.prompt for e in subject_examples([concept], DataConfig(resolution=world.SIZE))} == {world.instance_prompt()}


def test_labels_cover_every_head():
    heart = world.instance_scenes("banded_heart")[0]
    labels = heart.labels()
    assert world.ALL_SHAPES[labels["shape"]] == "heart"
    assert world.SUBJECT_LABELS[labels["subject"]] == "banded_heart"
    # a subject shape in a world colour is not the subject
    assert world.Scene("heart", "red", "white").subject is None
    with pytest.raises(KeyError, match="known"):
        world.get_subject("nope")


def test_generic_images_are_deterministic_and_varied():
    a = [np.asarray(world.generic_image(s)) for s in range(4)]
    b = [np.asarray(world.generic_image(s)) for s in range(4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])


# ---- classifier, recipes and evaluation helpers (no trained weights needed) -------------

def test_classifier_round_trip(tmp_path):
    import torch

    from dreambooth.miniworld.classifier import HEADS, AttributeClassifier, load_classifier

    torch.manual_seed(0)
    model = AttributeClassifier(width=8).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    logits = model(x)
    assert {k: v.shape for k, v in logits.items()} == {k: (3, len(v)) for k, v in HEADS.items()}
    model.save(tmp_path / "cls")
    again = load_classifier(tmp_path / "cls")
    torch.testing.assert_close(again(x)["shape"], logits["shape"], rtol=1e-2, atol=1e-2)  # fp16 on disk
    assert set(again.predict(x)["subject"]) <= set(world.SUBJECT_LABELS)
    with pytest.raises(FileNotFoundError, match="--stage classifier"):
        load_classifier(tmp_path / "missing")


def test_classifier_batches_are_deterministic_and_mixed():
    from dreambooth.miniworld.recipes import build_vae, classifier_batch

    vae = build_vae().eval()
    x1, y1 = classifier_batch(0, 3, 32, vae, 0.25)
    x2, y2 = classifier_batch(0, 3, 32, vae, 0.25)
    assert x1.shape == (32, 3, 32, 32) and bool((x1 == x2).all())
    assert all(bool((y1[k] == y2[k]).all()) for k in y1)
    assert len(set(y1["subject"].tolist())) > 1  # subjects and non-subjects in one batch


def test_normalised_entropy_and_attribute_prompts():
    from dreambooth.miniworld.evaluate import attribute_combinations, normalised_entropy

    assert normalised_entropy(["a"] * 10, 6) == 0.0
    assert normalised_entropy(list("abcdef"), 6) == pytest.approx(1.0)
    combos = attribute_combinations(24)
    assert combos == attribute_combinations(24) and len(set(combos)) == 24
    assert {c[0] for c in combos} == set(world.SHAPES) and {c[1] for c in combos} == set(world.COLOURS)
    assert {c[2] for c in combos} == set(world.BACKGROUNDS)


# ---- the committed assets (package data: they must be there, in a checkout and in a wheel) --

from dreambooth.miniworld.recipes import ASSETS  # noqa: E402


def test_committed_base_is_an_ordinary_sd_folder():
    import torch

    from dreambooth.models.load import load_components

    comps = load_components(ASSETS / "base")
    assert comps.family.name == "sd" and comps.schedule.prediction_type == "epsilon"
    assert len(comps.tokenizer) == 49408 and comps.tokenizer.convert_tokens_to_ids("sks</w>") == 48136
    assert comps.tokenizer.model_max_length == comps.text_encoder.config.max_position_embeddings == 16
    assert comps.unet.dtype == comps.text_encoder.dtype == comps.vae.dtype == torch.float32
    weights = sum(p.stat().st_size for p in (ASSETS / "base").rglob("*.safetensors"))
    assert weights < 17e6, f"the miniature SD base's weights are {weights / 1e6:.1f} MB; keep them small"


def test_committed_sdxl_base_is_an_ordinary_sdxl_folder_sharing_the_sd_bases_files():
    import json

    import torch

    from dreambooth.models.load import load_components

    folder = ASSETS / "base-sdxl"
    comps = load_components(folder)
    assert comps.family.name == "sdxl" and comps.keep_fp32 == {"vae"}
    assert comps.tokenizer_2.pad_token == "!" and comps.tokenizer.convert_tokens_to_ids("sks</w>") == 48136
    assert comps.unet.config.addition_embed_type == "text_time"
    # the base learned the unconditional case from empty captions: the pipeline must encode "", not zeros
    assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False
    own = [p for p in folder.rglob("*.safetensors") if p.parent.name != "vae"]
    assert sum(p.stat().st_size for p in own) < 15e6  # the budget for a new miniature base
    for shared, original in (("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
                             ("tokenizer/vocab.json", "tokenizer/vocab.json"), ("tokenizer_2/merges.txt", "tokenizer/merges.txt")):
        assert (folder / shared).read_bytes() == (ASSETS / "base" / original).read_bytes()  # a link in git, a copy in a wheel
    assert comps.unet.dtype == comps.text_encoder_2.dtype == torch.float32


def test_committed_if_base_is_an_ordinary_if_stage_one_folder():
    """The miniature DeepFloyd IF base: IFPipeline in pixel space, T5 reading each world word as one piece."""
    import json

    from dreambooth.models.load import load_components

    folder = ASSETS / "base-if"
    comps = load_components(folder)
    assert comps.family.name == "if" and "vae" not in comps.modules and comps.family.latent_factor(folder) == 1
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    unet = comps.unet.config
    assert (unet.in_channels, unet.out_channels, unet.sample_size) == (3, 6, world.SIZE)  # image in; noise + variance out
    assert unet.addition_embed_type == "text" and unet.encoder_hid_dim == comps.text_encoder.config.d_model
    # trained on the noise half only: the folder's scheduler samples with a fixed variance
    assert comps.inference_scheduler.config.variance_type == "fixed_small"
    tokens = comps.tokenizer.tokenize(world.describe("star", "purple", "gray") + " " + world.instance_prompt())
    assert all(t.startswith("\u2581") and len(t) > 1 for t in tokens), tokens  # no word spelled out letter by letter
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights < 15e6, f"the miniature IF base's weights are {weights / 1e6:.1f} MB; the issue's budget is 15 MB"


def test_dreambooth_train_fine_tunes_the_committed_if_base(tmp_path):
    from dreambooth.miniworld.demo import PAPER_SETTINGS, demo_config
    from dreambooth.train import train

    world.write_instance_images("split_moon", tmp_path / "instance_images")
    cfg = demo_config(tmp_path, "split_moon", ASSETS / "base-if",
                      {"train.max_steps": 2, "prior.num_class_images": 2, "prior.batch_size": 2, "prior.num_inference_steps": 2},
                      recipe=PAPER_SETTINGS)
    _trained_and_exported(train(cfg), ASSETS / "base-if", steps=2)
    assert (tmp_path / "model" / "model_index.json").is_file()
    images = sorted((tmp_path / "class_images").glob("*.png"))
    assert len(images) == 2
    from PIL import Image

    assert Image.open(images[0]).size == (world.SIZE, world.SIZE)  # class images at stage I's resolution


def test_committed_classifier_recognises_every_subject_and_world_images():
    from dreambooth.miniworld.classifier import load_classifier
    from dreambooth.miniworld.recipes import images_to_tensor

    model = load_classifier(ASSETS / "classifier")
    for name in world.SUBJECTS:
        pred = model.predict(images_to_tensor(world.instance_images(name)))
        assert pred["subject"] == [name] * 5
    examples = [world.world_example(50_000_000 + i) for i in range(40)]
    pred = model.predict(images_to_tensor([e[0] for e in examples]))
    truth = [e[2] for e in examples]
    assert pred["subject"] == ["none"] * 40
    for head, attr in (("shape", "shape"), ("colour", "colour"), ("background", "background")):
        assert sum(p == getattr(t, attr) for p, t in zip(pred[head], truth)) >= 38, head


def test_dreambooth_train_fine_tunes_the_committed_base(tmp_path):
    from dreambooth.miniworld.demo import PAPER_SETTINGS, demo_config
    from dreambooth.train import train

    world.write_instance_images("banded_heart", tmp_path / "instance_images")
    cfg = demo_config(tmp_path, "banded_heart", ASSETS / "base",
                      {"train.max_steps": 2, "prior.num_class_images": 2, "prior.batch_size": 2}, recipe=PAPER_SETTINGS)
    _trained_and_exported(train(cfg), ASSETS / "base", steps=2)
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 2


def test_evaluation_samples_each_base_with_its_sampler(tmp_path):
    """IF's pixel-space base is measured with IF's own DDPM 100 steps (DDIM 25 leaves noise); latent bases with DDIM 25,
    and a trained output with its base's sampler."""
    from dreambooth.miniworld.evaluate import BASES, default_settings

    assert (default_settings(BASES["if"]).scheduler, default_settings(BASES["if"]).num_inference_steps) == ("ddpm", 100)
    for family in ("sd", "sdxl"):
        assert (default_settings(BASES[family]).scheduler, default_settings(BASES[family]).num_inference_steps) == ("ddim", 25)
    (tmp_path / "config.yaml").write_text(f"model:\n  path: {BASES['if']}\n")
    assert default_settings(tmp_path, n=4, seed=3).scheduler == "ddpm" and default_settings(tmp_path, n=4, seed=3).n == 4


@pytest.mark.parametrize("family", ["sd", "sdxl", "if"])
def test_the_demo_default_trains_every_family(tmp_path, family):
    """`dreambooth demo --family F`'s recipe runs on each miniature base: the bar's default for SD (the identifier's
    embedding, learned alone for the first quarter of the steps, the class prompt from the frozen base, knowledge
    preservation on world captions), the earlier default for SDXL (no pivot; the embedding in both text encoders),
    the paper's for IF. `--steps 8` keeps the pivot's share (2 steps)."""
    from dreambooth.miniworld.demo import demo_config, family_overrides
    from dreambooth.miniworld.evaluate import BASES
    from dreambooth.train import train

    world.write_instance_images("banded_heart", tmp_path / "instance_images")
    overrides = {**family_overrides(family, steps=8), "prior.num_class_images": 2, "prior.batch_size": 2,
                 "prior.num_inference_steps": 2}
    cfg = demo_config(tmp_path, "banded_heart", BASES[family], overrides)
    default = family != "if"  # the IF demo keeps the paper's recipe (demo.PAPER_FOR_IF)
    assert (cfg.prior.source == "model" and cfg.prior.preserve_weight > 0) == default
    assert all((te.scope == "identifier") == default for te in cfg.text_encoders().values() if te.train)
    assert (cfg.train.max_steps, cfg.train.denoiser_start_step) == (8, 2 if family == "sd" else 0)
    _trained_and_exported(train(cfg), BASES[family], steps=8)
    assert (tmp_path / "class_images").exists() == (not default)  # the base as the prior makes no class images
