"""Single-file checkpoints (A1111/ComfyUI layout) in and out, kohya-format LoRA, and export verification."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth import tiny
from dreambooth.errors import DreamBoothError
from dreambooth.interop import layout
from dreambooth.interop import single_file as sf
from dreambooth.interop.convert import convert
from dreambooth.train import train

from test_train import make_cfg as _make_cfg

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_sd2_dir(tmp_path_factory):
    return tiny.build_sd(tmp_path_factory.mktemp("models") / "tiny-sd2", "tiny-sd2")


def _model(name):
    return {"sd": "tiny_sd_dir", "sd2": "tiny_sd2_dir", "sdxl": "tiny_sdxl_dir"}[name]


# ---- tables: our writer against a file written by the original Stable Diffusion code -----------

def _fixture_config(tmp_path, variant: str) -> Path:
    """The diffusers description of scripts/make_ldm_fixture.py's networks."""
    tiny.ARCHITECTURES["ldm-fixture"] = dict(
        resolution=32, prediction_type="epsilon",
        unet=tiny._sd_unet((32, 32), 1, 32, 2, groups=32, linear_projection=variant == "sd2"),
        vae=tiny._vae((32, 32), groups=32),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    try:
        return tiny.build_sd(tmp_path / f"config-{variant}", "ldm-fixture")
    finally:
        del tiny.ARCHITECTURES["ldm-fixture"]


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_file_from_the_original_code_converts_and_runs_the_same(tmp_path, variant):
    """The fixture's keys, shapes and reference outputs come from CompVis/Stability's own classes
    (scripts/make_ldm_fixture.py); diffusers' converter reads it, and our tables write it back."""
    state = load_file(FIXTURES / f"ldm_{variant}.safetensors")
    if variant == "sd2":  # the sd2 fixture holds only its UNet; complete it with sd1's other parts
        state.update({k: v for k, v in load_file(FIXTURES / "ldm_sd1.safetensors").items()
                      if not k.startswith("model.diffusion_model.")})
    source = tmp_path / "original.safetensors"
    save_file(state, str(source))
    config = _fixture_config(tmp_path, variant)
    report = convert(source, tmp_path / "diffusers", config=str(config))
    assert not report.problems, report.problems
    assert report.checks[0] == f"{len(state)} tensors written back identically"

    ref = load_file(FIXTURES / f"ldm_{variant}_reference.safetensors")
    unet = sf.saved_part(tmp_path / "diffusers", "unet", torch.float32)
    with torch.no_grad():
        out = unet(ref["ref.unet.x"].float(), ref["ref.unet.t"], encoder_hidden_states=ref["ref.unet.context"].float()).sample
    torch.testing.assert_close(out, ref["ref.unet.out"].float(), atol=2e-3, rtol=0)  # fp16-stored reference
    if variant == "sd1":
        vae = sf.saved_part(tmp_path / "diffusers", "vae", torch.float32)
        text = sf.saved_part(tmp_path / "diffusers", "text_encoder", torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(vae.decode(ref["ref.vae.z"].float()).sample, ref["ref.vae.out"].float(), atol=2e-3, rtol=0)
            torch.testing.assert_close(text(ref["ref.text.ids"]).last_hidden_state, ref["ref.text.out"].float(),
                                       atol=2e-3, rtol=0)

    # and back: our tables reproduce the original file key for key, bit for bit
    report = convert(tmp_path / "diffusers", tmp_path / "again.safetensors", precision="fp16")
    assert not report.problems, report.problems
    again = load_file(tmp_path / "again.safetensors")
    assert set(again) == set(state)
    assert all(torch.equal(again[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["sd", "sd2", "sdxl"])
def test_round_trip_is_bitwise_in_fp32(request, tmp_path, name):
    folder = request.getfixturevalue(_model(name))
    report = convert(folder, tmp_path / "model.safetensors", precision="fp32")
    assert not report.problems and all("(bitwise)" in c or "tensors read" in c for c in report.checks[:-1]), report.checks
    assert "from_single_file: rendered a 8x8 image" in report.checks[-1]  # as a user loads it
    report = convert(tmp_path / "model.safetensors", tmp_path / "back", config=str(folder))
    assert not report.problems, report.problems
    for part in sf.checkpoint_family(load_file(tmp_path / "model.safetensors"), "x").single_file:
        a = sf.saved_part(folder, part).state_dict()
        b = sf.saved_part(tmp_path / "back", part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.parametrize("shipped, kind, te", [("sd15", "v1", "cond_stage_model.transformer.text_model."),
                                               ("sd2-768-v", "v2", "cond_stage_model.model.transformer.resblocks."),
                                               ("sdxl-base", "xl_base", "conditioner.embedders.1.model.transformer.")])
def test_shipped_configs_are_the_public_architectures(shipped, kind, te):
    """Full size, no weights (meta tensors): our layout of each shipped config is what diffusers
    recognises as that model, and diffusers' own converters map every key back onto the modules."""
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as su

    config = sf.SHIPPED / shipped
    fam = {"sd15": "sd", "sd2-768-v": "sd", "sdxl-base": "sdxl"}[shipped]
    from dreambooth.models.load import FAMILIES
    family = FAMILIES[fam]
    index = json.loads((config / "model_index.json").read_text())
    modules = {}
    with init_empty_weights():
        import diffusers
        import transformers
        for part in family.single_file:
            lib, cls = index[part]
            cls = getattr(diffusers if lib == "diffusers" else transformers, cls)
            modules[part] = cls.from_config(cls.load_config(config / part)) if lib == "diffusers" else \
                cls(cls.config_class.from_pretrained(config / part))
    state = sf.original_state_dict(modules, family)
    assert su.infer_diffusers_model_type(state) == kind
    assert any(k.startswith(te) for k in state)
    unet_params = sum(p.numel() for p in modules["unet"].parameters())
    assert unet_params == {"sd15": 859_520_964, "sd2-768-v": 865_910_724, "sdxl-base": 2_567_463_684}[shipped]
    tracked = sf.TrackedDict(state)
    unet = su.convert_ldm_unet_checkpoint(tracked, modules["unet"].config)
    vae = su.convert_ldm_vae_checkpoint(tracked, modules["vae"].config)
    assert set(unet) == set(modules["unet"].state_dict()) and set(vae) == set(modules["vae"].state_dict())
    for part in family.text_encoders:
        prefix = family.single_file[part]
        if layout.uses_open_clip(modules[part].config):
            text = su.convert_open_clip_checkpoint(modules[part], tracked, prefix=prefix + "model.")
        else:
            text = su.convert_ldm_clip_checkpoint(tracked, prefix + "transformer.")
        expected = set(modules[part].state_dict())
        assert {k.removeprefix("text_model.") for k in text} >= {k.removeprefix("text_model.") for k in expected}, part
    assert not set(state) - tracked.read


def test_shipped_tokenizers_are_clip_with_the_right_padding():
    toks = sf.tokenizers_from(sf.SHIPPED / "sdxl-base")
    assert toks["tokenizer"]("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert toks["tokenizer"].pad_token_id == 49407 and toks["tokenizer_2"].pad_token_id == 0  # SDXL's second pads with "!"
    assert toks["tokenizer"].model_max_length == 77 and len(toks["tokenizer"]) == 49408
    assert sf.tokenizers_from(sf.SHIPPED / "sd2-512")["tokenizer"].pad_token_id == 0


def test_sd2_prediction_type_comes_from_the_metadata(tiny_sd2_dir, tmp_path):
    sf.folder_to_single_file(tiny_sd2_dir, tmp_path / "m.safetensors")
    state, metadata = sf.read_checkpoint(tmp_path / "m.safetensors")
    assert metadata[sf.PREDICTION_KEY] == "v"
    fam = sf.checkpoint_family(state, "m")
    assert sf.shipped_config(fam, state, metadata, Path("m")).name == "sd2-768-v"
    assert sf.shipped_config(fam, state, {sf.PREDICTION_KEY: "epsilon"}, Path("m")).name == "sd2-512"


# ---- reading: safety and recognition ----------------------------------------------------------

class NotATensor:
    pass


def test_pickle_needing_code_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "extra": NotATensor()}, path)
    with pytest.raises(DreamBoothError, match=r"model\.ckpt is a pickle checkpoint .*--allow-pickle"):
        sf.read_checkpoint(path)
    state, _ = sf.read_checkpoint(path, allow_pickle=True)
    assert list(state) == ["model.diffusion_model.x"]
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}}, plain)  # tensors only: the safe loader takes it
    assert torch.equal(sf.read_checkpoint(plain)[0]["a"], torch.ones(2))


def test_unknown_or_broken_files_are_named(tmp_path):
    save_file({"encoder.weight": torch.ones(1)}, str(tmp_path / "lora.safetensors"))
    state, _ = sf.read_checkpoint(tmp_path / "lora.safetensors")
    with pytest.raises(DreamBoothError, match=r"lora\.safetensors is not an SD 1\.x/2\.x or SDXL single-file"):
        sf.checkpoint_family(state, tmp_path / "lora.safetensors")
    refiner = {"model.diffusion_model.a": torch.ones(1), "conditioner.embedders.0.model.b": torch.ones(1),
               "first_stage_model.c": torch.ones(1)}
    with pytest.raises(DreamBoothError, match="SDXL refiner"):
        sf.checkpoint_family(refiner, "refiner.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DreamBoothError, match=r"junk\.safetensors is not a readable \.safetensors"):
        sf.read_checkpoint(tmp_path / "junk.safetensors")


def test_wrong_architecture_is_one_line_with_both_shapes(tiny_sd_dir, tmp_path):
    """The file's own shape is the fact the user needs (it once came out as 'torch', cut at torch.Size's dot)."""
    sf.folder_to_single_file(tiny_sd_dir, tmp_path / "m.safetensors")
    with pytest.raises(DreamBoothError, match=r"does not fit the architecture in .*sd15 \(time_embedding\.linear_1\.weight "
                                              r"is \[128, 32\] in the file, the config wants \[1280, 320\]\); "
                                              r"pass the matching config"):
        sf.to_diffusers(tmp_path / "m.safetensors", tmp_path / "out")  # detected as SD 1.x; the tiny shapes are not


def _like_a_hub_sd15_folder(tiny_sd_dir, folder):
    """The tiny model saved as a real SD 1.5 diffusers folder is: with a safety_checker/ and a feature_extractor/
    (CLIPImageProcessor) in model_index.json and on disk, and requires_safety_checker true."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessorPil

    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=checker,
                                                   feature_extractor=CLIPImageProcessorPil(), requires_safety_checker=True)
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]  # as the Hub's SD 1.5 folder names it
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_file_converted_against_a_full_sd15_folder_loads_in_diffusers(tiny_sd_dir, tmp_path):
    """`convert FILE OUT --config FOLDER`, FOLDER naming a safety checker and a feature extractor that no single
    file holds: OUT loads with StableDiffusionPipeline.from_pretrained, and the verification says it rendered."""
    from diffusers import StableDiffusionPipeline

    config = _like_a_hub_sd15_folder(tiny_sd_dir, tmp_path / "sd15-like")
    sf.folder_to_single_file(tiny_sd_dir, tmp_path / "m.safetensors")
    report = convert(tmp_path / "m.safetensors", tmp_path / "out", config=str(config))
    assert not report.problems, report.problems
    assert report.checks[-1] == "StableDiffusionPipeline.from_pretrained(out): rendered a 8x8 image in 2 steps"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")  # offline (conftest), as a user would
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    image = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_convert_verification_fails_a_folder_diffusers_cannot_load(tiny_sd_dir, tmp_path, monkeypatch):
    """Equal tensors are not enough: with the config's model_index.json copied as it is (naming a feature
    extractor that is not written), the check that loads the folder as a user does reports it."""
    config = _like_a_hub_sd15_folder(tiny_sd_dir, tmp_path / "sd15-like")
    sf.folder_to_single_file(tiny_sd_dir, tmp_path / "m.safetensors")
    monkeypatch.setattr(sf, "written_index", lambda index, written: index)
    report = convert(tmp_path / "m.safetensors", tmp_path / "out", config=str(config))
    assert report.checks[0].endswith("tensors written back identically")
    assert len(report.problems) == 1 and report.problems[0].startswith("StableDiffusionPipeline.from_pretrained(out): "), report


@pytest.mark.slow
def test_convert_cli_offline_with_no_hub_cache(tiny_sdxl_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home"), "DREAMBOOTH_CACHE": str(tmp_path / "c")}
    run = [sys.executable, "-m", "dreambooth.cli", "convert"]
    r = subprocess.run(run + [str(tiny_sdxl_dir), str(tmp_path / "xl.safetensors")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr[-2000:]
    r = subprocess.run(run + [str(tmp_path / "xl.safetensors"), str(tmp_path / "xl"), "--config", str(tiny_sdxl_dir)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "written back identically" in r.stdout, r.stderr[-2000:]
    assert not (tmp_path / "empty-hf-home" / "hub").exists()  # nothing was fetched or cached from the Hub
    # the pipelines verification loads made transformers note its image-processor fallback (torchvision is not
    # a dependency on purpose): a warning the user can do nothing about, so it is not shown
    assert "requires torchvision" not in r.stderr + r.stdout, r.stderr[-2000:]


def test_sampling_shows_no_image_processor_note(tiny_sd_dir, tmp_path):
    """Every pipeline class diffusers imports pulls in transformers' image processors; without torchvision
    transformers notes a fallback the user cannot act on. A plain `dreambooth sample` shows none of it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DREAMBOOTH_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "dreambooth.cli", "sample", str(tiny_sd_dir), "--prompt", "a dog",
                        "--steps", "2", "--resolution", "32", "--num-images", "1", "--out-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "1 images" in r.stdout, r.stderr[-2000:]
    assert "requires torchvision" not in r.stderr + r.stdout and "ImageProcessor" not in r.stderr, r.stderr[-2000:]


# ---- training from a single file, and what every export writes and checks ----------------------

def make_cfg(base, photos, out, **sections):
    """test_train's tiny config without prior preservation (no class images to generate)."""
    return _make_cfg(base, photos, out, **{"concept": {"class_prompt": None}, "prior": {"enabled": False}, **sections})


def test_training_from_a_single_file_equals_training_from_the_folder(tiny_sd_dir, photos, tmp_path):
    sf.folder_to_single_file(tiny_sd_dir, tmp_path / "base.safetensors")
    from_folder = train(make_cfg(tiny_sd_dir, photos, tmp_path / "a"))
    cfg = make_cfg(tmp_path / "base.safetensors", photos, tmp_path / "b",
                   model={"single_file_config": str(tiny_sd_dir)})
    from_file = train(cfg)
    assert from_file.losses == from_folder.losses  # the same weights, bit for bit
    cached = list((tmp_path / "cache" / "single-file").iterdir())
    assert len(cached) == 1 and (cached[0] / "model_index.json").is_file()
    mtime = (cached[0] / "unet").stat().st_mtime_ns
    train(make_cfg(tmp_path / "base.safetensors", photos, tmp_path / "c",
                   model={"single_file_config": str(tiny_sd_dir)}, train={"max_steps": 1}))
    assert (cached[0] / "unet").stat().st_mtime_ns == mtime  # converted once, then reused


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_lora_export_writes_kohya_and_both_load_back_bitwise(request, photos, tmp_path, name):
    model = request.getfixturevalue(_model(name))
    extra = {"text_encoder_2": {"train": True}} if name == "sdxl" else {}
    train(make_cfg(model, photos, tmp_path / "out", train={"method": "lora", "max_steps": 2},
                   lora={"rank": 4, "alpha": 2.0}, optim={"lr": 1e-2}, **extra))
    report = json.loads((tmp_path / "out" / "verification.json").read_text())
    render, *checks = report["checks"]
    pipeline = "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline"
    assert render == f"pytorch_lora_weights.safetensors on {pipeline}.from_pretrained(base): rendered a 8x8 image in 2 steps"
    assert report["passed"] and len(checks) == 2 * (3 if name == "sdxl" else 2)
    assert all("(bitwise)" in c for c in checks), checks
    kohya = load_file(tmp_path / "out" / "pytorch_lora_weights_kohya.safetensors")
    prefixes = {k.split("_")[1] for k in kohya}
    assert prefixes == ({"unet", "te1", "te2"} if name == "sdxl" else {"unet", "te"})
    alphas = {v.item() for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {2.0}  # the trained alpha, not diffusers' default (= rank)
    assert any(k.startswith("lora_te") and "_text_model_encoder_layers_0_self_attn_q_proj" in k for k in kohya)


def test_dora_export_loads_back_bitwise(tiny_sd_dir, photos, tmp_path):
    """lora.use_dora: the UNet's magnitude vectors train, are saved and load back through diffusers bit for bit;
    the text encoder's adapters stay plain LoRA, and no kohya copy is offered (neither loads back)."""
    out = tmp_path / "out"
    result = train(make_cfg(tiny_sd_dir, photos, out, train={"method": "lora", "max_steps": 2},
                            lora={"rank": 4, "alpha": 4.0, "use_dora": True}, optim={"lr": 1e-2}, text_encoder={"train": True}))
    assert all(v == v for v in result.losses.values())
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and "rendered a 8x8 image" in report["checks"][0]
    assert all("(bitwise)" in c for c in report["checks"][1:]), report["checks"]
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    magnitudes = [k for k in saved if "lora_magnitude_vector" in k]
    assert magnitudes and all(k.startswith("unet.") for k in magnitudes)
    assert any(k.startswith("text_encoder.") for k in saved)  # the text encoder's plain LoRA
    assert not (out / "pytorch_lora_weights_kohya.safetensors").exists()


def test_full_export_single_file_loads_in_diffusers_from_single_file(tiny_sd_dir, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 2},
                   export={"single_file": True, "single_file_precision": "fp32"}))
    report = json.loads((out / "verification.json").read_text())
    assert report["passed"] and any("all 368 tensors read" in c for c in report["checks"]), report
    assert "unet/ (diffusers folder): all 208 weights bitwise equal" in report["checks"]
    pipe = StableDiffusionPipeline.from_single_file(str(out / "model.safetensors"), config=str(out), local_files_only=True)
    trained = StableDiffusionPipeline.from_pretrained(out)
    a = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    b = trained("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    assert abs(a - b).max() < 1e-5


def test_a_failed_verification_keeps_the_diffusers_output(tiny_sd_dir, photos, tmp_path, monkeypatch):
    real = layout.to_original

    def swap_two_tensors(prefix, module, kind):  # a writer bug: two same-shaped tensors trade places
        state = real(prefix, module, kind)
        if kind == "unet":
            a, b = [k for k in state if k.endswith("attn1.to_q.weight")][:1] + [k for k in state if k.endswith("attn1.to_k.weight")][:1]
            state[a], state[b] = state[b], state[a]
        return state

    monkeypatch.setattr(layout, "to_original", swap_two_tensors)
    out = tmp_path / "out"
    with pytest.raises(DreamBoothError, match=r"does not load back as trained: model\.safetensors unet differs"):
        train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 1},
                       export={"single_file": True, "single_file_precision": "fp32"}))
    assert (out / "unet").is_dir() and (out / "model_index.json").is_file()  # the diffusers output is kept
    assert (out / "model.safetensors.unverified").is_file() and not (out / "model.safetensors").exists()
    report = json.loads((out / "verification.json").read_text())
    assert not report["passed"] and "unet/ (diffusers folder): all 208 weights bitwise equal" in report["checks"]


def test_a_lora_trained_from_a_single_file_samples_with_its_base(tiny_sd_dir, photos, tmp_path):
    from dreambooth.sampling import load_trained_pipeline

    sf.folder_to_single_file(tiny_sd_dir, tmp_path / "base.safetensors")
    out = tmp_path / "out"
    train(make_cfg(tmp_path / "base.safetensors", photos, out, train={"method": "lora", "max_steps": 1},
                   model={"single_file_config": str(tiny_sd_dir)}))
    card = (out / "README.md").read_text()
    assert "Trained from the single file" in card and "pytorch_lora_weights_kohya.safetensors" in card
    pipe = load_trained_pipeline(out, scheduler="ddim")  # the base is read from config.yaml: the file's cached copy
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
