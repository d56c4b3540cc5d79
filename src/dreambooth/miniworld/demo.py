"""The demo: teach the committed base one held-out subject, show before/after, measure it.

    from dreambooth.miniworld.demo import demo
    result = demo("outputs/miniworld-demo")            # ~ a few minutes on 2 CPU cores

It trains through the same `dreambooth.train.train` code path a real Stable Diffusion checkpoint
takes (the base is an ordinary diffusers pipeline folder), then writes `grid.png` (rows: prompts;
left half base, right half the fine-tuned model, same seeds) and `evaluation.json`, and returns
the evaluation (see `evaluate.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from . import world
from .evaluate import DEFAULT_BASE, DEFAULT_CLASSIFIER, EvalSettings, default_settings, evaluate, format_table

# The recipe that worked in the feasibility study: full fine-tune at lr 1e-4, batch 1 + 1 class
# image, prior preservation (100 class images, weight 1), text encoder trained, 800 steps.
DEMO_SETTINGS: dict[str, Any] = {
    "data.resolution": world.SIZE,
    "optim.lr": 1e-4,
    "train.max_steps": 800,
    "train.batch_size": 1,
    "prior.enabled": True,
    "prior.num_class_images": 100,
    "prior.loss_weight": 1.0,
    "prior.scheduler": "ddim",
    "prior.num_inference_steps": 25,
    "prior.guidance_scale": 5.0,
    "prior.batch_size": 50,
    "text_encoder.train": True,
}


def demo_config(output_dir: str | Path, subject: str = "banded_heart", base_dir: str | Path = DEFAULT_BASE,
                overrides: Optional[dict[str, Any]] = None):
    """The TrainConfig the demo trains with; `overrides` are dotted keys (e.g. {"prior.enabled": False})."""
    from ..config import build_config, dotted_to_nested

    output_dir = Path(output_dir)
    settings = {**DEMO_SETTINGS, **(overrides or {})}
    settings.update({
        "model.path": str(base_dir),
        "concept.instance_dir": str(output_dir / "instance_images"),
        "concept.instance_prompt": world.instance_prompt(),
        "train.output_dir": str(output_dir / "model"),
    })
    if settings.get("prior.enabled"):
        settings["concept.class_prompt"] = world.class_prompt()
        if settings.get("prior.source", "images") == "images":  # prior.source=model uses no class images
            settings.setdefault("concept.class_dir", str(output_dir / "class_images"))
    return build_config(dotted_to_nested(settings))


def before_after_grid(base_dir: str | Path, model_dir: str | Path, subject: str, seeds: int = 6, settings: EvalSettings = EvalSettings()):
    """Rows: instance prompt, recontextualisation prompts, class prompt. Left: base; right: model."""
    from PIL import Image

    from ..sampling import generate, image_grid, load_trained_pipeline

    prompts = [world.instance_prompt(), *world.recontext_prompts(subject).values(), world.class_prompt()]
    halves = []
    for folder in (base_dir, model_dir):
        pipe = load_trained_pipeline(folder, scheduler=settings.scheduler)
        images = generate(pipe, [p for p in prompts for _ in range(seeds)], [settings.seed + i for _ in prompts for i in range(seeds)],
                          num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                          height=world.SIZE, width=world.SIZE, batch_size=64)
        halves.append(image_grid(images, cols=seeds))
    w, h = halves[0].size
    grid = Image.new("RGB", (2 * w + 8, h), (255, 255, 255))
    grid.paste(halves[0], (0, 0))
    grid.paste(halves[1], (w + 8, 0))
    return grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST), prompts


def demo(output_dir: str | Path = "outputs/miniworld-demo", subject: str = "banded_heart", base_dir: str | Path = DEFAULT_BASE,
         overrides: Optional[dict[str, Any]] = None, n_eval: int = 32, seed: int = 0, verbose: bool = True,
         classifier_dir: str | Path = DEFAULT_CLASSIFIER) -> dict:
    """Train `subject` into the base, write grid.png and evaluation.json under `output_dir`, return the evaluation."""
    from ..train import train

    t0 = time.time()
    output_dir = Path(output_dir)
    world.write_instance_images(subject, output_dir / "instance_images")
    cfg = demo_config(output_dir, subject, base_dir, overrides)
    result = train(cfg)
    train_seconds = time.time() - t0
    model_dir = Path(cfg.train.output_dir)
    settings = default_settings(base_dir, n_eval, seed)  # the sampler suited to the base's family
    grid, prompts = before_after_grid(base_dir, model_dir, subject, settings=settings)
    grid.save(output_dir / "grid.png")
    evaluation = evaluate(model_dir, subject, base_dir=base_dir, classifier_dir=classifier_dir, settings=settings)
    evaluation.update({"train_seconds": round(train_seconds, 1), "steps": result.steps, "grid_rows": prompts,
                       "total_seconds": round(time.time() - t0, 1)})
    (output_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    if verbose:
        print(format_table(evaluation))
        print(f"trained {result.steps} steps in {train_seconds:.0f} s; grid: {output_dir / 'grid.png'} "
              f"(rows: {' | '.join(prompts)}; left base, right fine-tuned)")
    return evaluation
