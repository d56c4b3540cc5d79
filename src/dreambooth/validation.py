"""Validation images during training, and the run's metric log (TensorBoard + metrics.jsonl)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_bytes, atomic_write_text
from .config import ValidationConfig
from .sampling import generate, image_grid

log = logging.getLogger("dreambooth")


class Logger:
    """Scalars and images to TensorBoard (OUTPUT/logs) and scalars to OUTPUT/logs/metrics.jsonl."""

    def __init__(self, log_dir: Path, enabled: bool = True, resumed_at: int | None = None):
        """`resumed_at`: the checkpoint step a resumed run continues from. Lines the interrupted run
        logged after it are dropped (they are about to be logged again), from metrics.jsonl here and
        from TensorBoard through its purge_step."""
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        metrics = log_dir / "metrics.jsonl"
        if resumed_at is not None and metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines(keepends=True) if _step_of(line) <= resumed_at]
            atomic_write_text(metrics, "".join(kept))
        self.jsonl = metrics.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1)
        except ImportError:  # tensorboard is a dependency, but a trimmed install should still train
            log.warning("tensorboard is not installed; metrics go to %s only", log_dir / "metrics.jsonl")

    def scalars(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def image(self, step: int, name: str, image) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(name, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by the kill: drop it
        return float("inf")


@torch.no_grad()
def validate(comps, vcfg: ValidationConfig, resolution: int, samples_dir: Path, step: int, logger: Logger | None = None,
             photos: list | None = None, texts=None) -> Path:
    """Render every validation prompt with fixed seeds; save one grid (rows = prompts) as samples/step-NNNNNN.png.

    `photos`: the instance photos, for a family whose pipeline takes an image too (an upscaler).
    `texts`: cached prompt embeddings (inputs.Texts) to render from instead of running the text
    encoders (memory.offload_text_encoders keeps them on the CPU)."""
    was_training = [(m, m.training) for m in comps.modules.values()]
    for m, _ in was_training:
        m.eval()
    sampler = comps.schedule.sampler(vcfg.scheduler, comps.inference_scheduler.config, "validation.scheduler")
    pipe = comps.family.pipeline(comps, scheduler=sampler)
    prompts = [p for p in vcfg.prompts for _ in range(vcfg.num_images)]
    seeds = [vcfg.seed + i for _ in vcfg.prompts for i in range(vcfg.num_images)]
    inputs = comps.family.sample_inputs(comps, photos or [], len(prompts))
    if texts is not None:
        negative = texts.encode([vcfg.negative_prompt or ""] * len(prompts))
        inputs.update(comps.family.prompt_kwargs(comps, texts.encode(prompts), negative, vcfg.negative_prompt is None))
    images = generate(pipe, prompts, seeds, num_inference_steps=vcfg.num_inference_steps,
                      guidance_scale=vcfg.guidance_scale, negative_prompt=vcfg.negative_prompt,
                      height=resolution, width=resolution, batch_size=max(vcfg.num_images, 1), inputs=inputs)
    for m, training in was_training:
        m.train(training)
    grid = image_grid(images, cols=vcfg.num_images)
    samples_dir.mkdir(parents=True, exist_ok=True)
    path = samples_dir / f"step-{step:06d}.png"
    png = io.BytesIO()
    grid.save(png, format="PNG")
    atomic_write_bytes(path, png.getvalue())
    if logger is not None:
        logger.image(step, "validation", grid)
    return path
