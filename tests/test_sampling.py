"""Sampling helpers on the tiny SD model: schedulers, seeded batched generation, grids."""

import importlib.util

import numpy as np
import pytest
from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from PIL import Image

from dreambooth import sampling
from dreambooth.errors import DreamBoothError

RESOLUTION = 32  # as in conftest
HAS_SCIPY = importlib.util.find_spec("scipy") is not None
STEPS = 2


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return DiffusionPipeline.from_pretrained(tiny_sd_dir)


def _render(pipe, prompts, seeds, batch_size, **kwargs):
    images = sampling.generate(
        pipe, prompts, seeds, num_inference_steps=STEPS, guidance_scale=7.5,
        height=RESOLUTION, width=RESOLUTION, batch_size=batch_size, **kwargs,
    )
    return [np.asarray(im, dtype=np.int16) for im in images]


@pytest.mark.parametrize("name", sorted(sampling.SCHEDULERS))
def test_every_scheduler_builds_from_model_config_and_keeps_prediction_type(name, tiny_sd_v_dir):
    base = DDPMScheduler.from_pretrained(tiny_sd_v_dir, subfolder="scheduler").config
    if name == "lms" and not HAS_SCIPY:
        with pytest.raises(DreamBoothError, match="scipy"):
            sampling.make_scheduler(name, base)
        return
    scheduler = sampling.make_scheduler(name, base)
    assert type(scheduler) is sampling.SCHEDULERS[name]
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)


def test_dpmpp_is_the_plus_plus_solver_whatever_the_base_config():
    base = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").config
    assert sampling.make_scheduler("dpm++", base).config.algorithm_type == "dpmsolver++"


def test_unknown_scheduler_error_lists_valid_names(pipe):
    with pytest.raises(DreamBoothError) as err:
        sampling.set_scheduler(pipe, "heun")
    message = str(err.value)
    assert "'heun'" in message
    for name in sampling.SCHEDULERS:
        assert name in message


@pytest.mark.parametrize("name", sorted(sampling.SCHEDULERS))
def test_every_scheduler_renders_distinct_images(pipe, name):
    if name == "lms" and not HAS_SCIPY:
        pytest.skip("LMSDiscreteScheduler needs scipy")
    sampling.set_scheduler(pipe, name)
    assert type(pipe.scheduler) is sampling.SCHEDULERS[name]
    a, b = _render(pipe, ["a photo of a dog"] * 2, [1, 2], batch_size=2)
    assert a.shape == (RESOLUTION, RESOLUTION, 3)
    assert a.std() > 5  # not a blank image
    assert np.abs(a - b).mean() > 5  # the seed matters


@pytest.mark.parametrize("name", ["ddim", "euler_a"])  # deterministic and ancestral (noise per step)
def test_generate_is_batch_size_invariant(pipe, name):
    sampling.set_scheduler(pipe, name)
    prompts = ["a photo of a dog", "a photo of a cat", "a photo of a dog"]
    one_by_one = _render(pipe, prompts, [1, 2, 3], batch_size=1, negative_prompt="blurry")
    all_at_once = _render(pipe, prompts, [1, 2, 3], batch_size=3, negative_prompt="blurry")
    for x, y in zip(one_by_one, all_at_once):
        # Batched matmuls may round differently on CPU: allow one 8-bit level, on few pixels.
        assert np.abs(x - y).max() <= 1
        assert (x != y).mean() < 0.01
    # Same prompt, different seed: a genuinely different image.
    assert np.abs(one_by_one[0] - one_by_one[2]).mean() > 5


def test_image_depends_on_seed_not_position_in_batch(pipe):
    sampling.set_scheduler(pipe, "ddim")
    alone = _render(pipe, ["a dog"], [7], batch_size=4)[0]
    second = _render(pipe, ["a dog", "a dog"], [5, 7], batch_size=4)[1]
    assert np.abs(alone - second).max() <= 1


def test_generate_disables_pipeline_bar_and_checks_lengths(pipe):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sampling.generate(pipe, ["a", "b"], [0], num_inference_steps=STEPS, guidance_scale=1.0)
    images = sampling.generate(
        pipe, ["a"], [0], num_inference_steps=STEPS, guidance_scale=1.0,
        height=RESOLUTION, width=RESOLUTION, progress=True,
    )
    assert len(images) == 1 and images[0].size == (RESOLUTION, RESOLUTION)
    assert pipe._progress_bar_config.get("disable") is True


def test_image_grid_layout():
    colours = [(i * 40, 0, 0) for i in range(5)]
    tiles = [Image.new("RGB", (32, 16), c) for c in colours]
    grid = sampling.image_grid(tiles)  # ceil(sqrt(5)) = 3 columns, 2 rows
    assert grid.size == (96, 32)
    assert grid.getpixel((0, 0)) == colours[0]
    assert grid.getpixel((64 + 5, 0)) == colours[2]
    assert grid.getpixel((32 + 5, 16 + 5)) == colours[4]
    assert grid.getpixel((64 + 5, 16 + 5)) == (0, 0, 0)  # empty cell
    assert sampling.image_grid(tiles, cols=5).size == (160, 16)
    assert sampling.image_grid(tiles[:4]).size == (64, 32)
    with pytest.raises(ValueError):
        sampling.image_grid([])
