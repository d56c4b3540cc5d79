"""Every training option runs through the real recipe on the tiny model and gives finite, learning losses."""

import dataclasses
import json
import math
import re

import pytest
import torch

from dreambooth.errors import DreamBoothError
from dreambooth.tiny import write_photos
from dreambooth.train import train

from test_train import _final_weights, make_cfg, straight_and_resumed

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


@pytest.mark.parametrize("settings, key, instead", [
    ({"optim": {"optimizer": "adamw8bit"}}, "optim.optimizer=adamw8bit", "optim.optimizer=adamw"),
    ({"optim": {"moments_dtype": "int8"}, "memory": {"weights_dtype": "bf16", "mixed_precision": "bf16"}},
     "optim.moments_dtype=int8", "optim.moments_dtype=bf16"),
])
def test_8bit_settings_without_a_usable_bitsandbytes_are_clear_errors(tiny_sd_dir, photos, tmp_path, monkeypatch,
                                                                      settings, key, instead):
    """Not installed, or installed without kernels for this device: refused before training, naming
    the setting and the fix."""
    import sys

    import bitsandbytes.functional

    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "o", **settings)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
        with pytest.raises(DreamBoothError, match=re.escape(f"{key} needs bitsandbytes: pip install bitsandbytes, or use {instead}")):
            train(cfg)

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_blockwise' with arguments from the 'CPU' backend")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_blockwise", no_kernel)
    with pytest.raises(DreamBoothError, match=rf"{re.escape(key)}: bitsandbytes \S+ has no 8-bit kernels for (cpu|cuda) "
                                              r"\(NotImplementedError\); pip install -U bitsandbytes, or use " + re.escape(instead)):
        train(cfg)


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


def test_text_encoder_scope_identifier_trains_only_the_identifier_embedding(tiny_sd_dir, photos, tmp_path):
    """scope=identifier: the identifier's embedding row moves, and every other weight of the encoder (every
    other row too, with weight decay on) stays the base's; the UNet trains as usual. Also across a resume."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    out = tmp_path / "o"
    cfg = make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 2}, optim={"weight_decay": 0.1},
                   text_encoder={"scope": "identifier"}, checkpoint={"every_n_steps": 1})
    assert cfg.text_encoder.resolved_identifier_lr == 3e-3  # textual inversion's rate, not optim.lr
    train(cfg)
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3, resume=True)))  # from step 2
    rows = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")("sks", add_special_tokens=False).input_ids
    before = load_file(tiny_sd_dir / "text_encoder" / "model.safetensors")
    after = load_file(out / "text_encoder" / "model.safetensors")
    (key,) = [k for k in before if k.endswith("token_embedding.weight")]  # transformers' saved prefix varies
    changed = (before[key] != after[key]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(set(rows))  # the identifier's pieces (the tiny tokenizer splits "sks"), and only those
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)
    unet_before = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    unet_after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)


def test_identifier_lr_gives_the_identifier_its_own_rate_beside_the_encoder_weights(tiny_sd_dir, photos, tmp_path):
    """scope=all with identifier_lr: the encoder's layers train at text_encoder.lr, the identifier's embedding rows in
    a group of their own (no weight decay), and the rest of the token-embedding table stays the base's."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from dreambooth.models.load import load_components
    from dreambooth.models.trainable import setup_trainable

    out = tmp_path / "o"
    cfg = make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 2}, optim={"weight_decay": 0.1},
                   text_encoder={"lr": 1e-4, "identifier_lr": 5e-3})
    comps = load_components(cfg.model.path)
    trainable = setup_trainable(comps, "full", cfg.lora, cfg.text_encoders(), identifiers=("sks",))
    groups = trainable.param_groups(1e-3, cfg.text_encoders())
    assert [(g["lr"], g.get("weight_decay"), len(g["params"])) for g in groups[1:]] == [
        (1e-4, None, len(trainable.params["text_encoder"]) - 1), (5e-3, 0.0, 1)]
    train(cfg)
    rows = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")("sks", add_special_tokens=False).input_ids
    before = load_file(tiny_sd_dir / "text_encoder" / "model.safetensors")
    after = load_file(out / "text_encoder" / "model.safetensors")
    (key,) = [k for k in before if k.endswith("token_embedding.weight")]
    assert (before[key] != after[key]).any(dim=1).nonzero().flatten().tolist() == sorted(set(rows))
    assert any(not torch.equal(before[k], after[k]) for k in before if k != key)  # the layers trained too


def test_object_preset_trains_the_identifier_with_the_base_as_prior(tiny_sd_dir, photos, tmp_path):
    from dreambooth.config import build_config

    layer = {"preset": "object", "model": {"path": str(tiny_sd_dir)}, "data": {"resolution": 32, "min_size": 16},
             "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog"},
             "train": {"max_steps": 2, "output_dir": str(tmp_path / "o")}}
    assert build_config({"preset": "object"}).train.denoiser_start_step == 100  # pivotal tuning, shortened below
    layer["train"]["denoiser_start_step"] = 1
    with pytest.raises(DreamBoothError, match="class_prompt"):  # the base as prior needs the class named
        build_config(layer).validate()
    cfg = build_config(layer, {"concept": {"class_prompt": "a photo of a dog"}})
    assert (cfg.text_encoder.scope, cfg.prior.source, cfg.optim.lr) == ("identifier", "model", 2e-6)
    assert cfg.text_encoder.resolved_identifier_lr == 1e-3
    result = train(cfg)
    assert result.steps == 2 and not (tmp_path / "o" / "class_images").exists()


def test_lora_with_the_identifier_embedding_saves_it_as_a_textual_inversion_file(tiny_sd_dir, photos, tmp_path):
    """LoRA + text_encoder.scope=identifier: the denoiser trains as adapters, the text encoder only the identifier's
    rows (the base prior still works: it has no adapters to switch off). The export holds the adapters (none for the
    text encoder) and embeddings/sks.safetensors, which diffusers' load_textual_inversion loads into a fresh base so
    that a prompt with the identifier encodes as trained; `dreambooth sample`'s loader does the same. Across a resume."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from dreambooth.interop.embeddings import encoded
    from dreambooth.sampling import load_trained_pipeline

    out = tmp_path / "o"
    cfg = make_cfg(tiny_sd_dir, photos, out, train={"method": "lora", "max_steps": 2}, optim={"weight_decay": 0.1},
                   prior={"source": "model"}, text_encoder={"scope": "identifier"}, checkpoint={"every_n_steps": 1})
    train(cfg)
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3, resume=True)))
    assert json.loads((out / "verification.json").read_text())["passed"]
    assert any("embeddings/sks.safetensors" in c for c in json.loads((out / "verification.json").read_text())["checks"])
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)  # no adapters on the text encoder
    saved = load_file(out / "embeddings" / "sks.safetensors")
    ids = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")("sks", add_special_tokens=False).input_ids
    base_rows = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").get_input_embeddings().weight[ids]
    assert list(saved) == ["sks"] and saved["sks"].shape == base_rows.shape
    assert (saved["sks"] != base_rows).any(dim=1).all()  # every piece of the identifier trained

    pipe = load_trained_pipeline(out)
    base = load_trained_pipeline(tiny_sd_dir)
    assert torch.equal(encoded(pipe, "a photo of a dog"), encoded(base, "a photo of a dog"))
    assert not torch.allclose(encoded(pipe, "a photo of sks dog"), encoded(base, "a photo of sks dog"))
    assert "pipe.load_textual_inversion" in (out / "README.md").read_text()


def test_object_lora_preset_adapts_every_unet_layer_and_saves_the_identifier(tiny_sd_dir, photos, tmp_path):
    from safetensors.torch import load_file

    from dreambooth.config import build_config
    from dreambooth.presets import UNET_LORA_ALL_LAYERS

    cfg = build_config({"preset": "object-lora", "model": {"path": str(tiny_sd_dir)}, "data": {"resolution": 32, "min_size": 16},
                        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog",
                                    "class_prompt": "a photo of a dog"},
                        "train": {"max_steps": 2, "output_dir": str(tmp_path / "o")}})
    train(cfg)
    keys = [k.split(".lora_A")[0] for k in load_file(tmp_path / "o" / "pytorch_lora_weights.safetensors") if ".lora_A" in k]
    # every target is adapted somewhere (resnets and attention blocks alike), and nothing else is
    assert {t for t in UNET_LORA_ALL_LAYERS if any(k.endswith("." + t) for k in keys)} == set(UNET_LORA_ALL_LAYERS)
    assert all(any(k.endswith("." + t) for t in UNET_LORA_ALL_LAYERS) for k in keys)
    assert (tmp_path / "o" / "embeddings" / "sks.safetensors").is_file()


def test_text_encoder_scope_identifier_is_refused_where_it_cannot_work(tiny_sd_dir, tiny_sdxl_dir, photos, tmp_path):
    from transformers import CLIPTokenizer

    with pytest.raises(DreamBoothError, match="identifier_lr with text_encoder.scope=all needs train.method=full"):
        make_cfg(tiny_sd_dir, photos, tmp_path, train={"method": "lora"}, text_encoder={"identifier_lr": 3e-3}).validate()
    with pytest.raises(DreamBoothError, match="cannot load the trained embedding back"):  # SDXL's pooled embedding
        train(make_cfg(tiny_sdxl_dir, photos, tmp_path, train={"method": "lora"}, text_encoder={"scope": "identifier"}))
    vocab = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer").get_vocab()
    taken = next(w for w in vocab if w.isalpha() and len(w) > 1)  # a token diffusers would refuse to add again
    with pytest.raises(DreamBoothError, match=f"concept.identifier '{taken}' is already a token"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path, train={"method": "lora"}, text_encoder={"scope": "identifier"},
                       concept={"identifier": taken, "instance_prompt": f"a photo of {taken} dog"}))
    assert not (tmp_path / "class_images").exists()  # refused before any class image was drawn
    with pytest.raises(DreamBoothError, match="names none"):
        make_cfg(tiny_sd_dir, photos, tmp_path, concept={"instance_prompt": "dog"}, text_encoder={"scope": "identifier"}).validate()
    with pytest.raises(DreamBoothError, match="text_encoder.train is false"):
        make_cfg(tiny_sd_dir, photos, tmp_path, text_encoder={"train": False, "scope": "identifier"}).validate()


def test_partial_gradient_checkpointing_marks_high_resolution_blocks_and_trains_the_same(tiny_sd_dir, photos, tmp_path):
    from dreambooth.models.load import load_components
    from dreambooth.models.memory import apply_memory_options

    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "x", memory={"gradient_checkpointing": True, "checkpoint_levels": 1})
    comps = load_components(cfg.model.path, cfg.model.family)
    apply_memory_options(comps, cfg.memory, ["unet"] + ["text_encoder"] * cfg.text_encoder.train)
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
        apply_memory_options(comps, make_cfg(tiny_sd_dir, photos, tmp_path / "z", memory={"gradient_checkpointing": True, "checkpoint_levels": 9}).memory, ["unet"])


def test_classic_attention_is_the_same_maths_as_sdpa(tiny_sd_dir, photos, tmp_path):
    """memory.attention=classic (kept to measure what SDPA saves) swaps every UNet attention
    processor and computes the same thing."""
    from diffusers.models.attention_processor import AttnProcessor

    from dreambooth.models.load import load_components
    from dreambooth.models.memory import apply_memory_options

    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "x", memory={"attention": "classic"})
    comps = load_components(cfg.model.path, cfg.model.family)
    default = {type(p) for p in comps.unet.attn_processors.values()}
    apply_memory_options(comps, cfg.memory, ["unet"] + ["text_encoder"] * cfg.text_encoder.train)
    assert default != {AttnProcessor} and {type(p) for p in comps.unet.attn_processors.values()} == {AttnProcessor}
    losses = {name: list(train(make_cfg(tiny_sd_dir, photos, tmp_path / name, train={"max_steps": 3},
                                        memory={"attention": name})).losses.values()) for name in ("sdpa", "classic")}
    assert losses["classic"] == pytest.approx(losses["sdpa"], rel=1e-4)


def test_deepspeed_launch_refuses_what_deepspeed_cannot_run(tiny_sd_dir, photos, tmp_path, monkeypatch):
    # DeepSpeed itself needs CUDA; the start-up check only reads accelerate's distributed type.
    import accelerate
    from accelerate.utils import DistributedType

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(DreamBoothError, match="DeepSpeed .* text_encoder.train=true"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "ds"))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_denoiser_start_step_trains_the_identifier_first(tiny_sd_dir, photos, tmp_path, monkeypatch, method):
    """Pivotal tuning (train.denoiser_start_step=2): in steps 1-2 only the identifier's embedding moves, the
    denoiser's weights (or adapters) stay exactly where they started; from step 3 they train too. A run that
    crashes inside the first phase and resumes ends bitwise equal to one that did not. LoRA runs with the model
    prior, whose frozen base is the same denoiser with its adapters switched off and on again every step."""
    from safetensors.torch import load_file

    settings = dict(train={"max_steps": 4, "denoiser_start_step": 2, "method": method},
                    text_encoder={"scope": "identifier"}, checkpoint={"every_n_steps": 1, "keep": 10},
                    **({"prior": {"source": "model"}} if method == "lora" else {}))
    straight, resumed = straight_and_resumed(tiny_sd_dir, photos, tmp_path, monkeypatch, settings, crash_at=1)
    assert [resumed.losses[s] for s in (2, 3, 4)] == [straight.losses[s] for s in (2, 3, 4)]
    a, b = _final_weights(tmp_path / "a", method), _final_weights(tmp_path / "b", method)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    weights = {s: load_file(tmp_path / "a" / "checkpoints" / f"step-{s:06d}" / "trainable.safetensors") for s in (1, 2, 3)}
    denoiser = [k for k in weights[1] if k.startswith("unet.")]
    (embedding,) = [k for k in weights[1] if k.startswith("text_encoder.")]
    assert denoiser
    if method == "full":
        base = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(weights[2][k], base[k.removeprefix("unet.")]) for k in denoiser)
    else:  # peft starts every lora_B at zero
        assert all(not weights[2][k].any() for k in denoiser if "lora_B" in k)
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in denoiser)
    assert not torch.equal(weights[1][embedding], weights[2][embedding])  # the embedding learns alone
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in denoiser)  # then the denoiser joins


@pytest.mark.parametrize("settings, key", [
    (dict(train={"denoiser_start_step": 2}, text_encoder={"scope": "identifier"}), "train.denoiser_start_step"),
    (dict(optim={"fused_backward": True, "max_grad_norm": None}), "optim.fused_backward=true"),
])
def test_single_process_settings_refuse_a_distributed_launch(tiny_sd_dir, photos, tmp_path, monkeypatch, settings, key):
    """Settings that one process only can run are refused, naming the setting, before the model is loaded."""
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(DreamBoothError, match=re.escape(key) + r".*one process only \(this launch has 2\)"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "o", **settings))
    assert not (tmp_path / "o" / "class_images").exists()  # refused before any class image was made
