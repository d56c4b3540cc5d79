"""Inference helpers: pick a scheduler, render seeded images in batches, tile them into a grid.

Used by validation during training, by class-image generation (prior preservation) and by
`dreambooth sample`. Everything here works with any diffusers text-to-image pipeline (SD 1.x/2.x,
SDXL, IF, SD3) because it passes only the call arguments those pipelines share.
"""

import inspect
import math

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from tqdm.auto import tqdm

from dreambooth.errors import DreamBoothError
from dreambooth.schedule import DDPM_SAMPLERS, sampler_for

SCHEDULERS: dict[str, type] = DDPM_SAMPLERS
"""Sampler names accepted in configs and on the command line (config.Sampler), mapped to DDPM models' diffusers
classes; a rectified-flow model accepts its own few of them (schedule.FLOW_SAMPLERS)."""


def make_scheduler(name: str, base_config, flag: str = "scheduler") -> SchedulerMixin:
    """Build the sampler called `name` from a model's scheduler config, through the model's noise schedule
    (`schedule.sampler_for`): DDPM models take any of `SCHEDULERS`, rectified-flow models their flow samplers.

    Building from the model's own config keeps what the model was trained with (betas, prediction
    type, timestep spacing, shift); only the sampling algorithm changes.

    Args:
        name (str): One of `SCHEDULERS`' keys, e.g. "dpm++".
        base_config: The model's scheduler config, usually `pipe.scheduler.config`.
        flag (str): The setting that named the sampler, for the error message.

    Returns:
        SchedulerMixin: A fresh scheduler instance.

    Raises:
        DreamBoothError: If `name` is unknown or not a sampler for this kind of model, or its class
            needs a package that is not installed.

    Examples:
        >>> make_scheduler("euler", pipe.scheduler.config).config.prediction_type
        'epsilon'
    """
    return sampler_for(base_config, name, flag)


def set_scheduler(pipe, name: str, flag: str = "scheduler") -> None:
    """Replace `pipe.scheduler` with the sampler called `name`, built from the current config."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config, flag)


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    inputs: dict[str, list] | None = None,
) -> list[Image.Image]:
    """Render one image per (prompt, seed) pair.

    Each image gets its own `torch.Generator` seeded with its seed, and the pipeline draws each
    image's noise from that image's generator, so image i is the same whatever the batch size or
    its position in the batch. That is what makes validation grids comparable across runs and
    class-image generation resumable. ("The same" up to float rounding: batched matrix products
    may round differently, which can move a pixel by one 8-bit level.)

    Args:
        pipe: A diffusers text-to-image pipeline, already on its device.
        prompts (list[str]): One prompt per image.
        seeds (list[int]): One seed per image, same length as `prompts`.
        num_inference_steps (int): Denoising steps per image.
        guidance_scale (float): Classifier-free guidance scale; 1.0 turns guidance off.
        negative_prompt (str | None): Used for every image, if given.
        height (int | None): Image height in pixels; None lets the pipeline use the model's size.
        width (int | None): Image width in pixels; None lets the pipeline use the model's size.
        batch_size (int): Images per pipeline call; trades memory for speed, not results.
        progress (bool): Show a progress bar over batches.
        inputs (dict[str, list] | None): Further per-image pipeline arguments, one entry per image
            (a list or a tensor of first dimension len(prompts)): an upscaler's `image`, or the
            prompts' embeddings (`prompt_embeds`, ...), which replace `prompts` in the call.

    Returns:
        list[PIL.Image.Image]: The images, in the order of `prompts`.

    Raises:
        ValueError: If `prompts` and `seeds` differ in length or `batch_size` < 1.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Our bar counts batches; the pipeline's per-step bar would print a new line per batch.
    pipe.set_progress_bar_config(disable=True)
    # DeepFloyd IF's pipelines clean prompts with bs4/ftfy when those are installed (and print a warning per call
    # when not); the trainer encodes prompts as their fallback does (lower-case, strip), so sample a prompt the way
    # training read it, whatever is installed.
    cleaning = {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.__call__).parameters else {}
    starts = range(0, len(prompts), batch_size)
    images: list[Image.Image] = []
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        batch_prompts = prompts[start : start + batch_size]
        batch_seeds = seeds[start : start + batch_size]
        generators = [torch.Generator(device=pipe.device).manual_seed(seed) for seed in batch_seeds]
        embedded = "prompt_embeds" in (inputs or {})  # prompts given as embeddings: the text encoders are not run
        out = pipe(
            prompt=None if embedded else batch_prompts,
            negative_prompt=None if negative_prompt is None or embedded else [negative_prompt] * len(batch_prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pil",
            **cleaning,
            **({"height": height, "width": width} if height is not None else {}),  # an x4 upscaler takes neither
            **{name: values[start : start + batch_size] for name, values in (inputs or {}).items()},
        )
        images.extend(out.images)
    return images


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images row by row into one picture.

    Args:
        images (list[PIL.Image.Image]): The tiles; each cell is as large as the largest tile.
        cols (int | None): Columns; defaults to ceil(sqrt(len(images))), a near-square grid.

    Returns:
        PIL.Image.Image: An RGB image of `cols` x ceil(n / cols) cells, black where empty.

    Raises:
        ValueError: If `images` is empty or `cols` < 1.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if cols is None:
        cols = math.ceil(math.sqrt(len(images)))
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


def load_trained_pipeline(output_dir, base: str | None = None, scheduler: str = "dpm++", device: str = "cpu"):
    """A pipeline for a `dreambooth train` output: the saved pipeline (full), or base + adapters (LoRA).

    A LoRA output holds only `pytorch_lora_weights.safetensors`; its base model is read from the
    output's config.yaml (model.path) unless `base` is given.
    """
    from pathlib import Path

    import yaml
    from diffusers import DiffusionPipeline

    from dreambooth.files import finish_swap
    from dreambooth.interop.embeddings import load_identifier_embeddings
    from dreambooth.interop.single_file import cached_folder, is_single_file

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise DreamBoothError(f"{output_dir} is not a folder; give a dreambooth output folder")
    finish_swap(output_dir)  # an export interrupted by a kill is completed before anything is read
    lora_file = output_dir / "pytorch_lora_weights.safetensors"
    if (output_dir / "model_index.json").is_file():
        pipe = DiffusionPipeline.from_pretrained(output_dir)
    elif lora_file.is_file():
        model = {}
        if base is None:
            config = output_dir / "config.yaml"
            if not config.is_file():
                raise DreamBoothError(f"{output_dir} holds LoRA weights but no config.yaml naming the base model: pass --base")
            model = yaml.safe_load(config.read_text())["model"]
            base = model["path"]
        if is_single_file(base):  # trained from a single file: its converted (cached) folder
            base = str(cached_folder(base, model.get("single_file_config"), model.get("allow_pickle", False)))
        if not Path(base).is_dir():
            raise DreamBoothError(f"base model {base} (for the LoRA in {output_dir}) not found: pass --base PATH")
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(output_dir)
        load_identifier_embeddings(pipe, output_dir)  # text_encoder.scope=identifier: the trained identifier
        # Our training fits the noise only, never a learned variance (IF's UNets predict one): sample the
        # adapted model with a fixed variance. A full export already carries that scheduler.
        if pipe.scheduler.config.get("variance_type") in ("learned", "learned_range"):
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, variance_type="fixed_small")
    else:
        raise DreamBoothError(f"{output_dir} holds neither a pipeline (model_index.json) nor LoRA weights "
                              f"({lora_file.name}); is it a dreambooth output folder?")
    set_scheduler(pipe, scheduler)
    return pipe.to(device)
