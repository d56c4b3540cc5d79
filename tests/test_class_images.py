"""Class-image generation: provenance manifest, reuse, invalidation, resume, user folders."""

import hashlib
import json
import logging
import os
from dataclasses import replace

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth import sampling
from dreambooth.config import ConceptConfig, DataConfig
from dreambooth.data import class_images
from dreambooth.data.class_images import ClassImageSettings, ensure_class_images, model_fingerprint
from dreambooth.data.dataset import class_examples
from dreambooth.errors import DreamBoothError

RESOLUTION = 32  # as in conftest
FIELDS = {"file", "model", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance_scale", "resolution"}


def settings(**overrides) -> ClassImageSettings:
    base = ClassImageSettings(
        prompt="a photo of a dog", num_images=3, resolution=RESOLUTION,
        scheduler="ddim", num_inference_steps=2, batch_size=2,
    )
    return replace(base, **overrides)


class Loader:
    """A load_pipeline that loads the real tiny model and counts how often it was asked to."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return DiffusionPipeline.from_pretrained(self.model_dir)


def no_load():
    raise AssertionError("the pipeline must not be loaded when every image can be reused")


@pytest.fixture
def seeds_generated(monkeypatch):
    """Record the seeds of every image that `sampling.generate` renders."""
    seen: list[int] = []
    real = sampling.generate

    def spy(pipe, prompts, seeds, **kwargs):
        seen.extend(seeds)
        return real(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy)
    return seen


def manifest(class_dir) -> list[dict]:
    return [json.loads(line) for line in (class_dir / "manifest.jsonl").read_text().splitlines()]


def snapshot(paths) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in paths}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# --- model_fingerprint -------------------------------------------------------------------


def test_fingerprint_is_stable_and_independent_of_location(tiny_sd_dir, model_dir):
    first = model_fingerprint(tiny_sd_dir)
    assert len(first) == 64 and int(first, 16) >= 0
    assert model_fingerprint(str(tiny_sd_dir)) == first
    assert model_fingerprint(model_dir) == first  # a copy elsewhere holds the same weights
    (model_dir / "unet" / "config.json").write_text("{}")  # configs are not weights
    assert model_fingerprint(model_dir) == first


def test_fingerprint_changes_when_a_weight_file_changes(model_dir):
    before = model_fingerprint(model_dir)
    weights = model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the modification time tells the memo it changed
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    flipped = model_fingerprint(model_dir)
    assert flipped != before
    (model_dir / "extra.bin").write_bytes(b"\0")  # a new weight file counts too
    assert model_fingerprint(model_dir) not in (before, flipped)


def test_fingerprint_without_weights_teaches(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(DreamBoothError, match="no weight files") as err:
        model_fingerprint(tmp_path)
    assert str(tmp_path) in str(err.value)


# --- generation and reuse ----------------------------------------------------------------


def test_generates_images_and_manifest(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    s = settings(negative_prompt="blurry")
    paths = ensure_class_images(tiny_sd_dir, class_dir, s)  # default loader: from_pretrained

    assert [p.name[:12] for p in paths] == ["class_00000_", "class_00001_", "class_00002_"]
    assert sorted(p.name for p in class_dir.iterdir()) == sorted([p.name for p in paths] + ["manifest.jsonl"])
    for p in paths:
        assert p.name == f"{p.name[:12]}{hashlib.sha256(p.read_bytes()).hexdigest()[:10]}.png"
        with Image.open(p) as im:
            assert im.size == (RESOLUTION, RESOLUTION)
    assert np.abs(pixels(paths[0]) - pixels(paths[1])).mean() > 5  # seeds 0 and 1 differ

    entries = manifest(class_dir)
    assert [e["file"] for e in entries] == [p.name for p in paths]
    assert [e["seed"] for e in entries] == [0, 1, 2]
    for e in entries:
        assert set(e) == FIELDS
        assert e["model"] == model_fingerprint(tiny_sd_dir)
        assert (e["prompt"], e["negative_prompt"], e["scheduler"]) == ("a photo of a dog", "blurry", "ddim")
        assert (e["steps"], e["guidance_scale"], e["resolution"]) == (2, 7.5, RESOLUTION)


def test_images_match_sampling_with_the_recorded_seed(tiny_sd_dir, tmp_path):
    s = settings(seed=10, num_images=2)
    paths = ensure_class_images(tiny_sd_dir, tmp_path / "class", s, load_pipeline=Loader(tiny_sd_dir))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    sampling.set_scheduler(pipe, "ddim")
    (expected,) = sampling.generate(
        pipe, [s.prompt], [11], num_inference_steps=2, guidance_scale=7.5, height=RESOLUTION, width=RESOLUTION
    )
    assert np.abs(pixels(paths[1]) - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_second_call_reuses_without_loading_the_model(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    first = ensure_class_images(tiny_sd_dir, class_dir, settings(), load_pipeline=Loader(tiny_sd_dir))
    before = snapshot(first) | {"manifest.jsonl": (class_dir / "manifest.jsonl").stat().st_mtime_ns}

    second = ensure_class_images(tiny_sd_dir, class_dir, settings(batch_size=1), load_pipeline=no_load)

    assert second == first
    assert snapshot(second) | {"manifest.jsonl": (class_dir / "manifest.jsonl").stat().st_mtime_ns} == before


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prompt": "a photo of a cat"}, "prompt"),
        ({"num_inference_steps": 3}, "steps"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),
        ({"scheduler": "euler_a"}, "scheduler"),
        ({"seed": 5}, "seed"),
    ],
)
def test_changed_settings_invalidate_and_regenerate(tiny_sd_dir, tmp_path, caplog, change, field):
    class_dir = tmp_path / "class"
    old = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=2), load_pipeline=Loader(tiny_sd_dir))
    loader = Loader(tiny_sd_dir)

    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        new = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=2, **change), load_pipeline=loader)

    assert loader.calls == 1
    assert not any(p.exists() for p in old)  # stale files are ours: deleted
    assert set(new).isdisjoint(old)
    assert sorted(p.name for p in class_dir.glob("*.png")) == [p.name for p in new]
    recorded = [e[field] for e in manifest(class_dir)]
    assert recorded == ([5, 6] if field == "seed" else [next(iter(change.values()))] * 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"2 class images in {class_dir} were made with another {field};")


def test_caption_diverse_class_images_cycle_through_their_prompts(tiny_sd_dir, tmp_path, caplog):
    """Image i is made with prompt i mod k, records it, and trains with it; a changed list regenerates only the
    images whose prompt changed, and a folder made with the one class prompt stays valid for a list of just it."""
    class_dir = tmp_path / "class"
    plain = ensure_class_images(tiny_sd_dir, class_dir, settings(), load_pipeline=Loader(tiny_sd_dir))
    again = ensure_class_images(tiny_sd_dir, class_dir, settings(prompts=("a photo of a dog",)), load_pipeline=no_load)
    assert again == plain

    black, beach, cat = "a photo of a black dog", "a photo of a dog on a beach", "a photo of a cat"
    paths = ensure_class_images(tiny_sd_dir, class_dir, settings(prompts=(black, beach)), load_pipeline=Loader(tiny_sd_dir))
    assert [e["prompt"] for e in manifest(class_dir)] == [black, beach, black]
    assert class_images.image_prompts(paths, "a photo of a dog") == [black, beach, black]
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    sampling.set_scheduler(pipe, "ddim")
    (expected,) = sampling.generate(pipe, [beach], [1], num_inference_steps=2, guidance_scale=7.5,
                                    height=RESOLUTION, width=RESOLUTION)
    assert np.abs(pixels(paths[1]) - np.asarray(expected, dtype=np.int16)).max() <= 1  # made with its own prompt

    loader = Loader(tiny_sd_dir)
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        changed = ensure_class_images(tiny_sd_dir, class_dir, settings(prompts=(black, cat)), load_pipeline=loader)
    assert loader.calls == 1
    assert (changed[0], changed[2]) == (paths[0], paths[2]) and changed[1] != paths[1]  # only image 1's prompt changed
    assert class_images.image_prompts(changed, "a photo of a dog") == [black, cat, black]
    examples = class_examples([changed], [ConceptConfig(class_prompt="a photo of a dog")], DataConfig(resolution=RESOLUTION))
    assert [e.prompt for e in examples] == [black, cat, black]  # what the loop encodes for each class image
    assert any(r.getMessage().startswith(f"1 class images in {class_dir} were made with another prompt;")
               for r in caplog.records)


def test_user_supplied_class_images_train_with_their_captions(tmp_path):
    folder = tmp_path / "my_class"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / name)
    (folder / "a.txt").write_text("a photo of a black dog\n")
    assert class_images.image_prompts([folder / "a.png", folder / "b.png"], "a photo of a dog") == [
        "a photo of a black dog", "a photo of a dog"]


def test_changed_model_weights_invalidate_and_regenerate(model_dir, tmp_path, caplog):
    class_dir = tmp_path / "class"
    old = ensure_class_images(model_dir, class_dir, settings(), load_pipeline=Loader(model_dir))
    old_model = manifest(class_dir)[0]["model"]

    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, weights, metadata=metadata)

    loader = Loader(model_dir)
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        new = ensure_class_images(model_dir, class_dir, settings(), load_pipeline=loader)

    assert loader.calls == 1
    assert not any(p.exists() for p in old)
    assert {e["model"] for e in manifest(class_dir)} == {model_fingerprint(model_dir)} != {old_model}
    assert len(new) == 3 and all(p.exists() for p in new)
    assert any("3 class images" in r.getMessage() and "another model;" in r.getMessage() for r in caplog.records)


def test_more_images_generates_only_the_missing_ones(tiny_sd_dir, tmp_path, seeds_generated):
    class_dir = tmp_path / "class"
    first = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=2), load_pipeline=Loader(tiny_sd_dir))
    before = snapshot(first)
    assert seeds_generated == [0, 1]

    loader = Loader(tiny_sd_dir)
    more = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=5), load_pipeline=loader)

    assert loader.calls == 1
    assert seeds_generated == [0, 1, 2, 3, 4]
    assert more[:2] == first and snapshot(first) == before
    assert len(more) == 5 and [e["seed"] for e in manifest(class_dir)] == [0, 1, 2, 3, 4]

    # Resumed generation gives the images one run would have given.
    at_once = ensure_class_images(tiny_sd_dir, tmp_path / "at_once", settings(num_images=5), load_pipeline=Loader(tiny_sd_dir))
    for a, b in zip(more, at_once):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_fewer_images_returns_the_first_and_keeps_the_rest(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    three = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=3), load_pipeline=Loader(tiny_sd_dir))
    two = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=2), load_pipeline=no_load)
    assert two == three[:2]
    assert three[2].exists() and len(manifest(class_dir)) == 3


def test_image_deleted_by_hand_is_regenerated(tiny_sd_dir, tmp_path, seeds_generated):
    class_dir = tmp_path / "class"
    paths = ensure_class_images(tiny_sd_dir, class_dir, settings(), load_pipeline=Loader(tiny_sd_dir))
    paths[1].unlink()
    again = ensure_class_images(tiny_sd_dir, class_dir, settings(), load_pipeline=Loader(tiny_sd_dir))
    assert seeds_generated == [0, 1, 2, 1]
    assert again[0] == paths[0] and again[2] == paths[2] and again[1].exists()
    assert np.abs(pixels(again[1]) - pixels(again[0])).mean() > 5


# --- folders we do not own ---------------------------------------------------------------


def test_unknown_images_in_a_managed_folder_raise(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=1), load_pipeline=Loader(tiny_sd_dir))
    Image.new("RGB", (8, 8)).save(class_dir / "my_dog.JPG")

    with pytest.raises(DreamBoothError) as err:
        ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=1), load_pipeline=no_load)

    message = str(err.value)
    assert str(class_dir) in message and "my_dog.JPG" in message
    assert "class_images_user_supplied: true" in message and "move them out" in message
    assert (class_dir / "my_dog.JPG").exists()


def test_unknown_images_without_manifest_raise(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (8, 8)).save(class_dir / "a.png")
    (class_dir / "notes.txt").write_text("not an image, ignored")
    with pytest.raises(DreamBoothError, match="a.png"):
        ensure_class_images(tiny_sd_dir, class_dir, settings(), load_pipeline=no_load)
    assert sorted(p.name for p in class_dir.iterdir()) == ["a.png", "notes.txt"]


def test_user_supplied_folder_is_used_as_is(tiny_sd_dir, tmp_path, caplog):
    folder = tmp_path / "my_class"
    folder.mkdir()
    for name in ["b.jpg", "a.png", "c.WEBP"]:
        Image.new("RGB", (40, 24), (10, 20, 30)).save(folder / name)
    (folder / "readme.txt").write_text("ignored")
    listing = sorted(p.name for p in folder.iterdir())

    two = ensure_class_images(tiny_sd_dir, folder, settings(num_images=2), user_supplied=True, load_pipeline=no_load)
    assert [p.name for p in two] == ["a.png", "b.jpg"]

    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        all_ = ensure_class_images(tiny_sd_dir, folder, settings(num_images=5), user_supplied=True, load_pipeline=no_load)
    assert [p.name for p in all_] == ["a.png", "b.jpg", "c.WEBP"]
    assert any("3 class images but 5" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in folder.iterdir()) == listing  # nothing written or deleted


def test_user_supplied_empty_folder_teaches(tiny_sd_dir, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(DreamBoothError) as err:
        ensure_class_images(tiny_sd_dir, folder, settings(), user_supplied=True, load_pipeline=no_load)
    assert str(folder) in str(err.value) and "class_images_user_supplied" in str(err.value)


# --- crash safety ------------------------------------------------------------------------


def test_crash_mid_run_keeps_finished_batches_and_resumes(tiny_sd_dir, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    real = sampling.generate
    seen: list[int] = []

    def crash_on_second_batch(pipe, prompts, seeds, **kwargs):
        if seen:
            raise KeyboardInterrupt
        seen.extend(seeds)
        return real(pipe, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "generate", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=5), load_pipeline=Loader(tiny_sd_dir))

    assert [e["seed"] for e in manifest(class_dir)] == [0, 1]  # the first batch (batch_size=2)
    assert sorted(p.name for p in class_dir.iterdir()) == sorted([e["file"] for e in manifest(class_dir)] + ["manifest.jsonl"])

    monkeypatch.setattr(sampling, "generate", real)
    seen.clear()
    paths = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=5), load_pipeline=Loader(tiny_sd_dir))
    assert len(paths) == 5 and [e["seed"] for e in manifest(class_dir)] == [0, 1, 2, 3, 4]
    assert not list(class_dir.glob("*.tmp"))


def test_half_written_files_from_a_killed_run_are_removed(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    (class_dir / "class_00000_0123456789.png.tmp").write_bytes(b"half a png")
    (class_dir / "manifest.jsonl.tmp").write_text('{"file": ')
    paths = ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=1), load_pipeline=Loader(tiny_sd_dir))
    assert sorted(p.name for p in class_dir.iterdir()) == sorted([paths[0].name, "manifest.jsonl"])


def test_corrupt_manifest_names_the_line(tiny_sd_dir, tmp_path):
    class_dir = tmp_path / "class"
    ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=1), load_pipeline=Loader(tiny_sd_dir))
    with open(class_dir / "manifest.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DreamBoothError, match="manifest.jsonl line 2 is not valid JSON"):
        ensure_class_images(tiny_sd_dir, class_dir, settings(num_images=1), load_pipeline=no_load)


# --- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"num_images": 0}, "`num_images` must be >= 1"),
        ({"scheduler": "heun"}, "unknown `scheduler` 'heun'"),
    ],
)
def test_bad_settings_teach(bad, words):
    with pytest.raises(DreamBoothError, match=words.replace("(", r"\(")):
        settings(**bad)


def test_memo_is_keyed_on_file_stats(model_dir, monkeypatch):
    model_fingerprint(model_dir)
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    model_fingerprint(model_dir)
    assert opened == []  # memoised: no weight file re-read
    assert class_images._fingerprints  # the memo is where the value came from
