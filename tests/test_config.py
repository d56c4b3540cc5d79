"""TrainConfig: building from layers and presets, errors that name the key, validation, and the CLI flags."""

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from dreambooth.cli import build_parser, config_from_args
from dreambooth.config import (TrainConfig, build_config, deep_merge, dotted_to_nested, iter_fields, load_yaml,
                               yaml_text)
from dreambooth.errors import DreamBoothError
from dreambooth.presets import TRAIN_PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASE = {"model": {"path": "m"}, "concept": {"instance_dir": "d", "instance_prompt": "a photo of sks dog"}}


PRIOR = {"prior.enabled": True, "concept.class_prompt": "a photo of a dog"}


def valid(**dotted) -> TrainConfig:
    """A config that validates, with `dotted` overrides (e.g. {'optim.lr': 1e-6})."""
    return build_config(BASE, dotted_to_nested(dotted))


# ---- building -------------------------------------------------------------------------

def test_defaults():
    cfg = build_config()
    assert cfg == TrainConfig()
    assert cfg.optim.lr == 5e-6 and cfg.train.max_steps == 400 and cfg.data.resolution == 512
    assert cfg.lora.unet_targets is None  # the model family's attention projections
    # list defaults are not shared between instances
    cfg.validation.prompts.append("x")
    assert TrainConfig().validation.prompts == []


def test_dotted_to_nested_and_deep_merge():
    assert dotted_to_nested({"optim.lr": 1e-6, "optim.beta1": 0.8, "preset": "x"}) == \
        {"optim": {"lr": 1e-6, "beta1": 0.8}, "preset": "x"}
    base = {"optim": {"lr": 1, "beta1": 2}, "a": 1}
    assert deep_merge(base, {"optim": {"lr": 3}}) == {"optim": {"lr": 3, "beta1": 2}, "a": 1}
    assert base == {"optim": {"lr": 1, "beta1": 2}, "a": 1}  # not modified


def test_build_config_nested_layers_later_wins():
    cfg = build_config(
        {"optim": {"lr": 1e-6, "beta1": 0.8}, "train": {"max_steps": 10}},
        dotted_to_nested({"optim.lr": 3e-6, "data.random_flip": True}),
    )
    assert cfg.optim.lr == 3e-6  # the later layer
    assert cfg.optim.beta1 == 0.8  # kept from the earlier layer (merged, not replaced)
    assert cfg.train.max_steps == 10
    assert cfg.data.random_flip is True
    assert cfg.optim.beta2 == 0.999  # default


def test_preset_applies_and_explicit_values_win():
    face = build_config({"preset": "face"})
    assert face.optim.lr == 1e-6 and face.train.max_steps == 1000 and face.prior.enabled
    assert face.text_encoder.train and face.prior.num_class_images == 200
    cfg = build_config({"preset": "face", "optim": {"lr": 3e-6}, "train": {"max_steps": 400}})
    assert cfg.optim.lr == 3e-6
    assert cfg.train.max_steps == 400  # explicit, even though it equals the default
    assert cfg.prior.enabled and cfg.train.gradient_accumulation_steps == 2  # the rest of the preset stays
    # the preset sits under every layer, even when it is named in a later one
    cfg = build_config({"optim": {"lr": 7e-6}}, {"preset": "object"})
    assert cfg.optim.lr == 7e-6 and cfg.train.gradient_accumulation_steps == 4


def test_unknown_preset():
    with pytest.raises(DreamBoothError, match="unknown preset 'faces'.*object, object-lora, face, style"):
        build_config({"preset": "faces"})


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_every_preset_builds_and_applies(preset):
    cfg = build_config(BASE, {"preset": preset})
    for dotted, value in TRAIN_PRESETS[preset].items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted
    if cfg.prior.enabled:
        cfg.concept.class_prompt = "a photo of a dog"
    cfg.validate()


# ---- errors that name the key ----------------------------------------------------------

@pytest.mark.parametrize("layer, match", [
    ({"optm": {"lr": 1}}, r"unknown setting optm \(did you mean optim\?\)"),
    ({"optim": {"lrr": 1}}, r"unknown setting optim\.lrr \(did you mean optim\.lr\?\)"),
    ({"train": {"max_step": 1}}, r"train\.max_step \(did you mean train\.max_steps\?\)"),
    ({"concepts": [{"instance_dir": "a", "instance_promt": "p"}]}, r"concepts\[0\]\.instance_promt.*instance_prompt"),
    ({"optim": {"zzzzzz": 1}}, r"unknown setting optim\.zzzzzz \(known: .*lr.*\)"),
])
def test_unknown_keys_are_named(layer, match):
    with pytest.raises(DreamBoothError, match=match):
        build_config(layer)


@pytest.mark.parametrize("layer, match", [
    ({"train": {"max_steps": "abc"}}, r"train\.max_steps must be an integer; got 'abc'"),
    ({"train": {"max_steps": 2.5}}, r"train\.max_steps must be an integer"),
    ({"optim": {"lr": "fast"}}, r"optim\.lr must be a number; got 'fast'"),
    ({"optim": {"lr": True}}, r"optim\.lr must be a number"),
    ({"data": {"random_flip": "maybe"}}, r"data\.random_flip must be true or false"),
    ({"optim": {"lr": None}}, r"optim\.lr cannot be null"),
    ({"optim": 3}, r"optim must be a mapping"),
    ({"model": {"path": ["a"]}}, r"model\.path must be a string"),
])
def test_wrong_types_name_the_key(layer, match):
    with pytest.raises(DreamBoothError, match=match):
        build_config(layer)


def test_literal_choices_are_listed():
    with pytest.raises(DreamBoothError, match=r"optim\.optimizer must be one of adamw, adamw8bit, adafactor, prodigy, lion; got 'sgd'"):
        build_config({"optim": {"optimizer": "sgd"}})
    with pytest.raises(DreamBoothError, match=r"train\.method must be one of full, lora"):
        build_config({"train": {"method": "LoRA"}})


def test_values_are_converted():
    cfg = build_config({"optim": {"lr": "1e-6"}, "train": {"max_steps": 3.0}, "data": {"random_flip": "yes"},
                        "validation": {"prompts": "one prompt"}})
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)  # PyYAML reads 1e-6 as a string
    assert cfg.train.max_steps == 3 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.random_flip is True
    assert cfg.validation.prompts == ["one prompt"]
    cfg = build_config({"concepts": [{"instance_dir": "a", "instance_prompt": "p"}]})
    assert cfg.concepts == [dataclasses.replace(TrainConfig().concept, instance_dir="a", instance_prompt="p")]


# ---- validate() ------------------------------------------------------------------------

def test_valid_config_validates():
    """validate() hands back the very config it checked, unchanged, so `cfg = build_config(...).validate()` holds."""
    for dotted in ({}, PRIOR, {**PRIOR, "prior.source": "model", "text_encoder.train": True,
                               "text_encoder.scope": "identifier", "train.denoiser_start_step": 100}):
        cfg = valid(**dotted)
        before = copy.deepcopy(cfg)
        assert cfg.validate() is cfg
        assert cfg == before


# Settings that are each fine alone but contradict another section: (the combination, the keys its
# message must name, the smallest change that makes it consistent). The fix must validate, so a
# check that refuses too much fails here as well as one that refuses nothing.
CROSS_SECTION = [
    ({**PRIOR, "prior.source": "model", "concept.class_dir": "cls"}, ["concept.class_dir", "prior.source=model"],
     {"prior.source": "images"}),
    ({"text_encoder.train": True, "text_encoder.scope": "identifier", "concept.instance_prompt": "dog"},
     ["text_encoder.scope=identifier", "concept.identifier"], {"concept.identifier": "sks"}),
    ({"text_encoder.train": True, "memory.offload_text_encoders": True}, ["memory.offload_text_encoders"],
     {"text_encoder.train": False}),
    ({"optim.fused_backward": True, "optim.max_grad_norm": None, "train.gradient_accumulation_steps": 2},
     ["optim.fused_backward", "train.gradient_accumulation_steps=2"], {"train.gradient_accumulation_steps": 1}),
    ({"optim.fused_backward": True, "optim.max_grad_norm": None, "memory.mixed_precision": "fp16"},
     ["optim.fused_backward", "memory.mixed_precision=fp16"], {"memory.mixed_precision": "bf16"}),
    ({"memory.weights_dtype": "bf16", "memory.mixed_precision": "bf16", "optim.optimizer": "adafactor"},
     ["memory.weights_dtype=bf16", "optim.optimizer=adafactor"], {"optim.optimizer": "adamw"}),
    ({"optim.moments_dtype": "int8"}, ["optim.moments_dtype=int8", "memory.weights_dtype=bf16", "optim.optimizer=adamw8bit"],
     {"memory.weights_dtype": "bf16", "memory.mixed_precision": "bf16"}),
    ({"train.select": "best", "checkpoint.every_n_steps": 100}, ["train.select=best", "monitor.every_n_steps"],
     {"monitor.every_n_steps": 100}),
    ({"train.select": "best", "checkpoint.every_n_steps": 100, "monitor.every_n_steps": 100, "ema.enabled": True},
     ["train.select=best", "ema.enabled"], {"ema.enabled": False}),
]


@pytest.mark.parametrize("dotted, keys, fix", CROSS_SECTION, ids=[keys[0] for _, keys, _ in CROSS_SECTION])
def test_cross_section_contradictions_are_refused_by_name(dotted, keys, fix):
    with pytest.raises(DreamBoothError) as err:
        valid(**dotted).validate()
    for key in keys:
        assert key in str(err.value), (key, str(err.value))
    valid(**{**dotted, **fix}).validate()


@pytest.mark.parametrize("dotted, keys", [
    ({"model.path": ""}, ["model.path"]),
    ({"concept.instance_dir": ""}, ["concept.instance_dir"]),
    ({"concept.instance_prompt": ""}, ["concept.instance_prompt"]),
    ({"prior.enabled": True}, ["concept.class_prompt", "prior.enabled"]),
    ({"concept.class_prompt": "a dog"}, ["concept.class_prompt", "prior.enabled"]),
    ({"concept.class_dir": "cls"}, ["class_dir", "prior.enabled"]),
    ({"text_encoder.stop_step": 10}, ["stop_step", "text_encoder.train"]),
    ({"text_encoder.lr": 1e-6}, ["text_encoder.lr", "text_encoder.train"]),
    ({"text_encoder.scope": "identifier"}, ["scope", "text_encoder.train"]),
    ({"text_encoder.train": True, "text_encoder.identifier_lr": 3e-3, "train.method": "lora"}, ["text_encoder.identifier_lr", "train.method=full"]),
    ({"text_encoder.train": True, "text_encoder.scope": "identifier", "text_encoder.lr": 1e-4}, ["text_encoder.lr", "text_encoder.identifier_lr"]),
    ({"text_encoder.train": True, "text_encoder.identifier_lr": 0.0}, ["text_encoder.identifier_lr"]),
    ({"text_encoder.train": True, "memory.cache_text_embeddings": True}, ["memory.cache_text_embeddings", "text_encoder.train"]),
    ({"memory.cache_latents": True, "data.random_flip": True}, ["memory.cache_latents", "data.random_flip"]),
    ({"memory.cache_latents": True, "data.center_crop": False}, ["memory.cache_latents", "data.center_crop"]),
    ({"data.resolution": 0}, ["data.resolution"]),
    ({"train.max_steps": 0}, ["train.max_steps"]),
    ({"train.batch_size": 0}, ["train.batch_size"]),
    ({"train.gradient_accumulation_steps": 0}, ["train.gradient_accumulation_steps"]),
    ({"lora.rank": 0}, ["lora.rank"]),
    ({"checkpoint.keep": 0}, ["checkpoint.keep"]),
    ({"optim.lr": 0.0}, ["optim.lr"]),
    ({"lora.dropout": 1.0}, ["lora.dropout"]),
    ({"objective.snr_gamma": 0.0}, ["objective.snr_gamma"]),
    ({"ema.decay": 1.0}, ["ema.decay"]),
    ({"validation.every_n_steps": 50}, ["validation.every_n_steps", "validation.prompts"]),
    # pivotal tuning
    ({"train.denoiser_start_step": 10}, ["train.denoiser_start_step", "text_encoder.train", "text_encoder.scope=identifier"]),
    ({"text_encoder.train": True, "train.max_steps": 100, "train.denoiser_start_step": 100},
     ["train.denoiser_start_step", "train.max_steps=100", "0 to turn pivotal tuning off"]),
    ({"text_encoder.train": True, "train.denoiser_start_step": -1}, ["train.denoiser_start_step"]),
    ({"text_encoder.train": True, "text_encoder.stop_step": 5, "train.denoiser_start_step": 10},
     ["text_encoder.stop_step=5", "train.denoiser_start_step=10"]),
    # caption-diverse class images
    ({"concept.class_prompts": ["a photo of a red dog"]}, ["concept.class_prompts", "prior.enabled"]),
    ({**PRIOR, "prior.source": "model", "concept.class_prompts": ["a photo of a red dog"]},
     ["concept.class_prompts", "prior.source=model", "prior.preserve_prompts"]),
    ({**PRIOR, "concept.class_images_user_supplied": True, "concept.class_prompts": ["a photo of a red dog"]},
     ["concept.class_prompts", "class_images_user_supplied", "name.txt"]),
    ({**PRIOR, "concept.class_prompts": ["a photo of a red dog", " "]}, ["concept.class_prompts", "empty"]),
    ({**PRIOR, "concept.class_prompts": ["a photo of a red dog", "a photo of sks dog"]}, ["concept.class_prompts", "'sks'"]),
])
def test_validate_names_the_key(dotted, keys):
    cfg = valid(**dotted)
    with pytest.raises(DreamBoothError) as err:
        cfg.validate()
    for key in keys:
        assert key in str(err.value)


def test_validate_fixes_pass():
    """Each inconsistency above has a consistent counterpart that validates."""
    valid(**{"prior.enabled": True, "concept.class_prompt": "a photo of a dog"}).validate()
    valid(**{"text_encoder.train": True, "text_encoder.stop_step": 10, "text_encoder.lr": 1e-6}).validate()
    assert valid(**{"text_encoder.train": True, "text_encoder.scope": "identifier"}).validate().text_encoder.resolved_identifier_lr == 3e-3
    assert valid(**{"text_encoder.train": True}).validate().text_encoder.resolved_identifier_lr is None  # the blog's: one rate
    valid(**{"data.random_flip": True}).validate()  # caching left at its default (off when augmenting)
    valid(**{"validation.every_n_steps": 50, "validation.prompts": ["a"]}).validate()
    valid(**{"data.resolution": 504}).validate()
    valid(**{**PRIOR, "concept.class_prompts": ["a photo of a red dog", "a photo of a dog on a beach"]}).validate()
    valid(**{"text_encoder.train": True, "text_encoder.scope": "identifier", "train.denoiser_start_step": 10}).validate()


def test_concept_and_concepts_together():
    cfg = build_config(BASE, {"concepts": [{"instance_dir": "a", "instance_prompt": "p"}]})
    with pytest.raises(DreamBoothError, match="`concept`.*`concepts`"):
        cfg.validate()


def test_concepts_errors_are_indexed():
    cfg = build_config({"model": {"path": "m"}, "concepts": [{"instance_dir": "a", "instance_prompt": "p"},
                                                             {"instance_dir": "b"}]})
    with pytest.raises(DreamBoothError, match=r"concepts\[1\]\.instance_prompt"):
        cfg.validate()


def test_derived_cache_defaults():
    assert valid().cache_latents and valid().cache_text_embeddings
    assert not valid(**{"data.random_flip": True}).cache_latents
    assert not valid(**{"data.center_crop": False}).cache_latents
    assert not valid(**{"text_encoder.train": True}).cache_text_embeddings
    assert not valid(**{"memory.cache_latents": False}).cache_latents


def test_resolved_concepts_fills_class_dir():
    cfg = build_config({"model": {"path": "m"}, "prior": {"enabled": True}, "train": {"output_dir": "out"},
                        "concepts": [{"instance_dir": "a", "instance_prompt": "p", "class_prompt": "c"},
                                     {"instance_dir": "b", "instance_prompt": "q", "class_prompt": "d", "class_dir": "mine"}]})
    concepts = cfg.resolved_concepts()
    assert [c.class_dir for c in concepts] == [str(Path("out") / "class_images" / "0"), "mine"]
    assert cfg.concepts[0].class_dir is None  # the config itself is not modified
    # the single `concept` when no list; no default without prior preservation
    assert valid().resolved_concepts()[0].class_dir is None
    one = valid(**{"prior.enabled": True, "concept.class_prompt": "c", "train.output_dir": "o"}).resolved_concepts()
    assert len(one) == 1 and one[0].class_dir == str(Path("o") / "class_images" / "0")
    assert one[0].instance_dir == "d"


# ---- YAML -----------------------------------------------------------------------------

def test_yaml_text_reads_back_as_a_config_file(tmp_path):
    """An output's config.yaml (yaml_text, written by the export) given back as --config builds the same config."""
    cfg = valid(**{"optim.lr": 1e-6, "validation.prompts": ["a", "b"], "objective.snr_gamma": 5.0})
    text = yaml_text(cfg)
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(TrainConfig)]  # field order, not sorted
    (tmp_path / "config.yaml").write_text(text)
    assert build_config(load_yaml(tmp_path / "config.yaml")) == cfg


def test_load_yaml_errors(tmp_path):
    with pytest.raises(DreamBoothError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1,\n")
    with pytest.raises(DreamBoothError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(DreamBoothError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


SHIPPED = sorted(CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []


@pytest.mark.skipif(not SHIPPED, reason="no YAML files in configs/ yet")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load(path):
    cfg = build_config(load_yaml(path))
    assert isinstance(cfg, TrainConfig)
    cfg.validate()  # the shipped examples are consistent as written


# ---- field documentation -----------------------------------------------------------------

def test_iter_fields_documents_every_leaf():
    fields = list(iter_fields(TrainConfig))
    keys = [k for k, *_ in fields]
    assert len(keys) == len(set(keys)) > 50
    assert {"optim.lr", "train.max_steps", "concept.instance_prompt", "concepts", "preset"} <= set(keys)
    assert not any(k in keys for k in ("optim", "train", "model"))  # sections are not leaves
    for key, tp, default, help_text in fields:
        assert help_text.strip(), f"{key} has no help text"
    defaults = {k: d for k, _, d, _ in fields}
    assert defaults["optim.lr"] == 5e-6 and defaults["validation.prompts"] == [] and defaults["preset"] is None


# ---- the command line -------------------------------------------------------------------

def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_cli_flags():
    cfg = parse("--model.path", "X", "--concept.instance_dir", "D", "--concept.instance_prompt", "P",
                "--optim.lr", "1e-6", "--data.random_flip", "--validation.prompts", "a", "b",
                "--objective.snr_gamma", "null")
    assert cfg.model.path == "X" and cfg.concept.instance_dir == "D" and cfg.concept.instance_prompt == "P"
    assert cfg.optim.lr == 1e-6
    assert cfg.data.random_flip is True
    assert cfg.validation.prompts == ["a", "b"]
    assert cfg.objective.snr_gamma is None
    assert cfg.train.max_steps == 400  # untouched default
    cfg.validate()


def test_cli_values_and_bool_forms():
    cfg = parse("--data.center_crop", "false", "--objective.snr_gamma", "5", "--train.max_steps", "12",
                "--text_encoder.stop_step", "None", "--train.method", "lora")
    assert cfg.data.center_crop is False
    assert cfg.objective.snr_gamma == 5.0
    assert cfg.train.max_steps == 12
    assert cfg.text_encoder.stop_step is None
    assert cfg.train.method == "lora"
    with pytest.raises(DreamBoothError, match=r"train\.max_steps must be an integer"):
        parse("--train.max_steps", "abc")


def test_cli_config_file_then_flag_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-6, "beta1": 0.8}, "train": {"max_steps": 50}}))
    cfg = parse("--config", str(path), "--optim.lr", "3e-6")
    assert cfg.optim.lr == 3e-6  # the flag
    assert cfg.optim.beta1 == 0.8 and cfg.train.max_steps == 50  # the file


def test_cli_preset_file_and_flag_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: face\ntrain:\n  max_steps: 50\n")
    cfg = parse("--config", str(path), "--optim.lr", "4e-6")
    assert cfg.optim.lr == 4e-6  # flag over preset
    assert cfg.train.max_steps == 50  # file over preset
    assert cfg.prior.enabled  # preset under both
    assert parse("--preset", "style").data.random_flip is True


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _squash(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines (also at hyphens)


def test_help_lists_every_flag_with_its_default(capsys):
    out = _help_text(capsys)
    squashed = _squash(out)
    for key, _, default, _ in iter_fields(TrainConfig):
        if key == "concepts":
            continue  # a list of mappings: YAML only, no flag
        assert f"--{key} " in out, key
        assert _squash(f"(default: {default!r})") in squashed, key
    assert "--concepts" not in out


def test_help_shows_each_field_help_verbatim(capsys):
    squashed = _squash(_help_text(capsys))
    for key, _, _, help_text in iter_fields(TrainConfig):
        if key == "concepts":
            continue
        assert _squash(help_text) in squashed, key


def test_help_with_percent_sign_is_shown_verbatim(capsys):
    out = _help_text(capsys)
    with_percent = [help_text for *_, help_text in iter_fields(TrainConfig) if "%" in help_text]
    assert with_percent  # ema.warmup's "67% of the average": argparse %-formats help strings
    for help_text in with_percent:
        assert _squash(help_text) in _squash(out)
    assert "%%" not in out and "option_strings" not in out


def test_help_shows_choices_as_accepted(capsys):
    out = _help_text(capsys)
    assert "--train.method {full,lora}" in out
    assert parse("--train.method", "lora").train.method == "lora"
