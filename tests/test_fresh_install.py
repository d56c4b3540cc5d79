"""A fresh install works and loses nothing: the lock, the start-up compatibility check, fail-fast
settings, export before the final validation, atomic re-export, metrics on resume, small defects."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from dreambooth import compat, files
from dreambooth.cli import main
from dreambooth.config import SAMPLERS, build_config
from dreambooth.errors import DreamBoothError
from dreambooth.train import train

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(model, photos, out, **sections):
    base = {
        "model": {"path": str(model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog"},
        "data": {"resolution": 32, "min_size": 16},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 2, "batch_size": 1, "output_dir": str(out)},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


# ---- the lock ---------------------------------------------------------------------------------

def _lock() -> dict[str, str]:
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("==") for line in lines)


def test_lock_pins_every_installed_dependency_and_this_is_what_runs():
    """The lock holds exact versions of everything but torch, and this environment installed them."""
    import importlib.metadata as md

    lock = _lock()
    assert "torch" not in lock  # the hardware-specific build is the user's choice
    for name in ("diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes"):
        assert name in lock, f"{name} missing from requirements.lock"
    if os.environ.get("CI"):  # CI installs with -c requirements.lock: every pin must hold
        wrong = {n: (v, md.version(n)) for n, v in lock.items() if md.version(n) != v}
        assert not wrong, f"installed versions differ from requirements.lock: {wrong}"


def test_pyproject_excludes_the_known_bad_pair():
    """transformers >= 5.24 wants peft >= 0.22, which does not exist yet: the range stops before it."""
    text = (ROOT / "pyproject.toml").read_text()
    assert '"transformers>=4.45,<5.24"' in text


# ---- the start-up compatibility check ------------------------------------------------------------

def test_compat_names_a_bad_transformers_peft_pair(monkeypatch):
    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda p: "0.21.2" if p == "peft" else "5.24.0" if p == "transformers" else real(p))
    monkeypatch.setattr(compat, "_minimum", lambda module, attr: "0.22.0" if module.startswith("transformers") else "0.17.0")
    cfg = build_config({"model": {"path": "m"}, "train": {"method": "lora"}, "text_encoder": {"train": True}})
    with pytest.raises(DreamBoothError) as err:
        compat.check_environment(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "transformers 5.24.0 needs peft >= 0.22.0, but peft 0.21.2 is installed" in message
    assert "requirements.lock" in message
    # UNet-only LoRA goes through diffusers alone, whose minimum 0.21.2 meets
    compat.check_environment(build_config({"model": {"path": "m"}, "train": {"method": "lora"}}))


def test_compat_reads_the_libraries_own_minimums():
    assert compat._minimum("diffusers.utils.constants", "MIN_PEFT_VERSION")
    assert compat._minimum("no.such.module", "X") is None


def test_compat_missing_peft_and_optional_packages(monkeypatch):
    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda p: None if p in ("peft", "prodigyopt", "xformers") else real(p))
    with pytest.raises(DreamBoothError, match="train.method=lora needs peft"):
        compat.check_environment(build_config({"model": {"path": "m"}, "train": {"method": "lora"}}))
    with pytest.raises(DreamBoothError, match="optim.optimizer=prodigy needs prodigyopt"):
        compat.check_environment(build_config({"model": {"path": "m"}, "optim": {"optimizer": "prodigy"}}))
    with pytest.raises(DreamBoothError, match="memory.attention=xformers needs xformers"):
        compat.check_environment(build_config({"model": {"path": "m"}, "memory": {"attention": "xformers"}}))


def test_compat_scheduler_without_its_package(monkeypatch):
    from dreambooth import sampling

    class NeedsScipy:
        def __init__(self, *a, **k):
            raise ImportError("LMSDiscreteScheduler requires the scipy library")

    monkeypatch.setitem(sampling.SCHEDULERS, "lms", NeedsScipy)
    with pytest.raises(DreamBoothError, match="validation.scheduler=lms needs a package that is not installed"):
        compat.check_environment(build_config({"model": {"path": "m"}, "validation": {"scheduler": "lms"}}))


def test_compat_runs_before_any_work(tiny_sd_dir, photos, tmp_path, monkeypatch):
    """A bad pair fails before the model is loaded or a class image is generated."""
    monkeypatch.setattr(compat, "check_peft", lambda *a, **k: (_ for _ in ()).throw(DreamBoothError("bad pair")))
    out = tmp_path / "out"
    cfg = make_cfg(tiny_sd_dir, photos, out, train={"method": "lora", "max_steps": 2, "batch_size": 1, "output_dir": str(out)},
                   prior={"enabled": True, "num_class_images": 2}, concept={"class_prompt": "a photo of a dog"})
    with pytest.raises(DreamBoothError, match="bad pair"):
        train(cfg)
    assert not out.exists()


# ---- fail fast ---------------------------------------------------------------------------------

def test_scheduler_names_are_checked_when_the_config_is_read():
    from dreambooth.sampling import SCHEDULERS

    assert set(SAMPLERS) == set(SCHEDULERS)
    for key in ("validation", "prior"):
        with pytest.raises(DreamBoothError, match=rf"{key}.scheduler must be one of"):
            build_config({key: {"scheduler": "dpmpp"}})


def test_literal_fields_are_checked_by_validate_too():
    cfg = build_config({"model": {"path": "m"}, "concept": {"instance_dir": "d", "instance_prompt": "p"}})
    cfg.validation.scheduler = "dpmpp"  # set in Python, past the YAML/CLI conversion
    with pytest.raises(DreamBoothError, match="validation.scheduler must be one of"):
        cfg.validate()


def test_config_errors_come_before_heavy_imports(tmp_path):
    """A settings typo is reported without importing torch, diffusers or transformers."""
    code = ("import sys; from dreambooth.cli import main; rc = main(['train', '--model.path', 'm', "
            "'--concept.instance_dir', 'd', '--concept.instance_prompt', 'p', '--optim.lr', '-1e-4']); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules]; "
            "print(rc, heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert "optim.lr must be positive, got -0.0001" in done.stderr


def test_negative_number_values_reach_the_config_check(capsys):
    rc = main(["train", "--model.path", "m", "--concept.instance_dir", "d", "--concept.instance_prompt", "p",
               "--optim.lr", "-1e-4"])
    assert rc == 2
    assert "optim.lr must be positive, got -0.0001" in capsys.readouterr().err


def test_resolution_error_names_the_models_own_factor(tiny_sd_dir, photos, tmp_path):
    """The tiny VAE downsamples by 2, not 8: the message says so and proposes a valid value."""
    with pytest.raises(DreamBoothError, match=r"multiple of 2 .* steps of 2 pixels: latent factor x patch size\), got 33; try 32"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "out", data={"resolution": 33}))
    assert not (tmp_path / "out").exists()


# ---- lose nothing ------------------------------------------------------------------------------

def test_a_failing_final_validation_keeps_the_trained_model(tiny_sd_dir, photos, tmp_path, monkeypatch):
    import dreambooth.train as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(train_module, "validate", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="validation broke"):
        train(make_cfg(tiny_sd_dir, photos, out, validation={"prompts": ["a photo of sks dog"], "num_images": 1}))
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()


def test_the_model_card_links_the_final_grid(tiny_sd_dir, photos, tmp_path):
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, validation={"prompts": ["a photo of sks dog"], "num_images": 1,
                                                           "num_inference_steps": 2}))
    assert "![samples](samples/step-000002.png)" in (out / "README.md").read_text()


def _staged_export(out: Path, names: dict[str, str]) -> Path:
    staged = out / ".export-staging"
    staged.mkdir(parents=True)
    for name, text in names.items():
        if name.endswith("/"):
            (staged / name).mkdir()
            (staged / name / "weights").write_text(text)
        else:
            (staged / name).write_text(text)
    return staged


@pytest.mark.parametrize("killed_after", [0, 1, 2, 3, 4, 5])
def test_re_export_is_atomic_after_a_kill_at_any_move(tmp_path, monkeypatch, killed_after):
    """Old export: unet/, README.md, old.bin; new: unet/, README.md, model_index.json. A kill after
    any number of renames, then the next reader's finish_swap, gives exactly the new export; the run's
    other files stay."""
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "weights").write_text("old")
    (out / "README.md").write_text("old")
    (out / "old.bin").write_text("old")
    (out / "logs").mkdir()
    staged = _staged_export(out, {"unet/": "new", "README.md": "new", "model_index.json": "new"})

    real, calls = os.replace, []

    def replace(src, dst):
        if Path(src).parent == staged:  # one of the export's moves (not the journal's own write)
            if len(calls) >= killed_after:
                raise KeyboardInterrupt  # the kill
            calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    try:
        files.swap_in(staged, out, stale=("unet", "README.md", "old.bin"))
        completed = True
    except KeyboardInterrupt:
        completed = False
    monkeypatch.setattr(files.os, "replace", real)
    assert completed == (killed_after >= 3)
    files.finish_swap(out)  # what the next train / sample / evaluate does first
    assert (out / "unet" / "weights").read_text() == "new"
    assert (out / "README.md").read_text() == "new" and (out / "model_index.json").read_text() == "new"
    assert not (out / "old.bin").exists() and (out / "logs").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "logs", "model_index.json", "unet"]


def test_a_folder_written_whole_appears_complete_or_not_at_all(tmp_path):
    """files.atomic_folder (checkpoints): an error mid-write leaves the old folder as it was; the next
    write clears the leftover staging folder and replaces the old one whole."""
    target = tmp_path / "step-000002"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_folder(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt  # the kill
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with files.atomic_folder(target) as tmp:
        assert list(tmp.iterdir()) == []  # the killed write's leftovers are gone
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_full_then_lora_export_leaves_no_stale_parts(tiny_sd_dir, photos, tmp_path):
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out))
    assert (out / "unet").is_dir()
    train(make_cfg(tiny_sd_dir, photos, out, train={"method": "lora", "max_steps": 2, "batch_size": 1, "output_dir": str(out)},
                   optim={"lr": 1e-4}))
    names = {p.name for p in out.iterdir()}
    assert "pytorch_lora_weights.safetensors" in names
    assert not names & {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}


def test_resume_truncates_metrics_to_the_resumed_step(tiny_sd_dir, photos, tmp_path, monkeypatch):
    """A run killed after logging steps 3-4 past its step-2 checkpoint logs each step exactly once."""
    from dreambooth import checkpoint as ckpt

    out = tmp_path / "out"
    real = ckpt.save_checkpoint

    def crash_at_4(output_dir, step, *args, **kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return real(output_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", crash_at_4)
    settings = dict(train={"max_steps": 6, "batch_size": 1, "output_dir": str(out)}, checkpoint={"every_n_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(tiny_sd_dir, photos, out, **settings))
    logged = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # steps 3 and 4 were logged, then the kill: their checkpoint never came
    (out / "logs" / "metrics.jsonl").open("a").write('{"step": 5, "lo')  # and a line cut short
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    settings["train"]["resume"] = True
    train(make_cfg(tiny_sd_dir, photos, out, **settings))  # resumes from step 2
    logged = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


# ---- small ones --------------------------------------------------------------------------------

def test_every_photo_is_decoded_once(tiny_sd_dir, photos, monkeypatch):
    from PIL import Image

    from dreambooth.data import dataset

    opened = []
    real = Image.open

    def counting(path, *a, **k):
        opened.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(Image, "open", counting)
    cfg = make_cfg(tiny_sd_dir, photos, "unused")
    examples = dataset.subject_examples(cfg.resolved_concepts(), cfg.data)
    assert len(examples) == 5 and len(opened) == 5 and len(set(opened)) == 5


def test_class_images_generate_without_deprecation_warnings(tiny_sd_dir, tmp_path):
    from dreambooth.data.class_images import ClassImageSettings, ensure_class_images

    settings = ClassImageSettings(prompt="a photo of a dog", num_images=1, resolution=32, scheduler="ddim",
                                  num_inference_steps=2, guidance_scale=1.0, negative_prompt=None, seed=0, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ensure_class_images(tiny_sd_dir, tmp_path / "class", settings)
    assert len(list((tmp_path / "class").glob("*.png"))) == 1


def test_saved_config_round_trips(tiny_sd_dir, photos, tmp_path):
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["validation"]["scheduler"] == "dpm++" and build_config(saved).train.max_steps == 2
