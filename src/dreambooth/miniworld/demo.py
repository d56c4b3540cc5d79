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

from ..presets import UNET_LORA_ALL_LAYERS
from . import world
from .evaluate import (DEFAULT_BASE, DEFAULT_CLASSIFIER, SELECTION_SETTINGS, EvalSettings, attribute_combinations,
                       default_settings, evaluate, format_table)

# The paper's recipe, as the feasibility study ran it: full fine-tune at lr 1e-4, batch 1 + 1 class
# image, prior preservation (100 class images, weight 1), text encoder trained, 800 steps. The
# experiments' tables (experiments.py) are measured against it.
PAPER_SETTINGS: dict[str, Any] = {
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


def preserve_prompts(leave_out_selection: bool = False) -> list[str]:
    """Knowledge-preservation prompts for the miniature world: the (shape, colour, background) captions of
    pretraining that the prompt-following measurement never asks for (144 of 168), so it stays held out;
    `leave_out_selection`: nor the ones train.select=best scores checkpoints on (SELECTION_SETTINGS), so that
    the choice is made on prompts the model was not trained to keep either."""
    asked = set(attribute_combinations(EvalSettings().attribute_prompts, EvalSettings().seed))
    if leave_out_selection:
        asked |= set(attribute_combinations(SELECTION_SETTINGS.attribute_prompts, SELECTION_SETTINGS.seed))
    return [world.describe(*combo) for combo in world.world_combinations() if combo not in asked]


# The default: what the acceptance bar (bar.TARGETS, every held-out subject x several training seeds;
# docs/experiments/acceptance-bar.md) kept of the paper's recipe and what it changed. Over training seeds 0-9 it meets
# every target on 28 of 40 runs (the earlier default, below: 25; the paper's recipe: 0 of seeds 0-2), and on the
# 20 runs of seeds 5-9, which played no part in any choice, 15 (the earlier default 13); its worst subject
# fidelity there is 0.97 (0.25) and its class drift 0.00 everywhere.
# - The text encoder learns only the identifier's embedding (text_encoder.scope=identifier). With the whole
#   encoder trained, a subject failed to bind to "sks" in some seeds ("sks toy" and "a toy" gave the same
#   half-learned images) and re-contextualisation collapsed in others; the embedding alone separated the
#   identifier in every run measured, and every other prompt encodes as before.
# - Pivotal tuning (train.denoiser_start_step): for the first 200 steps only the embedding trains, against the
#   frozen base denoiser, then both train for 600 more. Where re-contextualisation collapsed, the denoiser had
#   bound the subject to "sks" in the training prompt only ("sks toy on a black background": an ordinary toy);
#   an embedding that already draws the subject through the base carries to new prompts. At 1e-3, not
#   textual inversion's 3e-3: faster, the embedding also took in the photos' gray background in one run.
# - The class prompt's target is the frozen base's own prediction (prior.source=model), and knowledge
#   preservation (weight 1) distils the base on world captions the measurement never asks: an embedding
#   learned through the base sits near the world's own words, and weight 0.3 let their prompts turn into it.
DEFAULT_CHANGES: dict[str, Any] = {
    "prior.source": "model",
    "prior.preserve_prompts": preserve_prompts(),
    "prior.preserve_weight": 1.0,
    "text_encoder.scope": "identifier",
    "text_encoder.identifier_lr": 1e-3,
    "train.denoiser_start_step": 200,
    "train.max_steps": 800,
}
# The earlier default (bar candidate identifier+kp0.3@600; 7 of 12 on seeds 0-2, 25 of 40 on seeds 0-9), as
# changes to the default: no pivot, the embedding at textual inversion's 3e-3, preservation weight 0.3, 600 steps.
# The LoRA default and the SDXL demo build on it (below).
EARLIER_DEFAULT: dict[str, Any] = {"prior.preserve_weight": 0.3, "text_encoder.identifier_lr": None,
                                   "train.denoiser_start_step": 0, "train.max_steps": 600}
DEMO_SETTINGS: dict[str, Any] = {**PAPER_SETTINGS, **DEFAULT_CHANGES}

# The LoRA default (`dreambooth demo --lora`, the `object-lora` preset's miniature analogue; bar candidate
# experiments.LORA_CANDIDATE): the earlier default (no pivot, the embedding at 3e-3, preservation weight 0.3)
# with rank-8 adapters in place of the denoiser's weights, on every layer of its attention blocks and resnets,
# at ten times the full fine-tune's rate, for 700 steps. The identifier's embedding trains beside them and is
# saved as a textual-inversion file. It meets every target on all 12 runs of seeds 0-2; 700 steps was chosen on
# those runs, between 600 (7 of 12: two banded_heart seeds had not learned the subject, 0.53 and 0.78) and 800
# (10 of 12: split_moon's prompt following fell to 0.91 and 0.92 in two seeds). On training seeds 3 and 4, never
# used in choosing, it met 3 of 8, and on seeds 5-9 11 of 20 (full default 15; acceptance-bar.md). The pivot before it
# met 2 of 6 of its misses against 1, and cost prompt following, so LoRA goes without it. Adapters on the
# attention projections alone learned half the subject at best (banded_heart seed 0: subject fidelity 0.44 at
# lr 1e-3, 0.53 at 3e-3), and without the identifier's embedding none of it (0.00, text encoder frozen).
LORA_CHANGES: dict[str, Any] = {
    **EARLIER_DEFAULT,
    "train.method": "lora",
    "lora.rank": 8,
    "lora.alpha": 8.0,
    "lora.unet_targets": list(UNET_LORA_ALL_LAYERS),
    "optim.lr": 1e-3,
    "train.max_steps": 700,
}
# `dreambooth demo --no-prior`: no preservation of any kind (class prompt or general knowledge)
NO_PRIOR: dict[str, Any] = {"prior.enabled": False, "prior.source": "images", "prior.preserve_weight": 0.0, "prior.preserve_prompts": []}


# The bar chose the default on the SD base only. On the weak IF base (docs/experiments/miniature-bases.md)
# it did worse than the paper's recipe (banded_heart, one seed: subject / prompt fidelity / drift / following
# 0.31 / 0.03 / 0.22 / 0.01 against 0.69 / 0.22 / 0.00 / 0.04), plausibly because the base's own 4-step samples,
# which the model prior distils on, are noise on this base (it needs DDPM 100), so the IF demo keeps the paper's.
PAPER_FOR_IF: dict[str, Any] = {"prior.source": "images", "prior.preserve_weight": 0.0, "prior.preserve_prompts": [],
                                "text_encoder.scope": "all", "text_encoder.identifier_lr": None,
                                "train.denoiser_start_step": 0, "train.max_steps": PAPER_SETTINGS["train.max_steps"]}


def family_overrides(family: str = "sd", no_prior: bool = False, lora: bool = False,
                     steps: Optional[int] = None) -> dict[str, Any]:
    """What `dreambooth demo --family F [--no-prior] [--lora] [--steps N]` changes in the recipe for that family's
    miniature base. `steps`: the same recipe in N steps in all, its embedding-only steps (the pivot) keeping their
    share of them."""
    from ..errors import DreamBoothError

    if lora and family != "sd":  # SDXL's and IF's pipelines cannot load the trained identifier beside a LoRA
        raise DreamBoothError(f"--lora runs the measured LoRA default on the sd base only (not {family}): it saves the "
                              "trained identifier as a textual-inversion file, which only SD 1.x/2.x pipelines load back")
    overrides: dict[str, Any] = dict(LORA_CHANGES) if lora else {}
    if family == "sdxl":  # the earlier default, every text encoder the base has trained the same way, and twice the
        # steps, as the SDXL base needs them (banded_heart, one seed: at 600 steps 0.53 / 0.33 / 0.06 / 1.00, at 1200
        # 1.00 / 0.98 / 0.00 / 1.00, meeting the bar; the paper's recipe at 1600: following 0.79). The default's pivot
        # at twice its steps (400 + 1200) lost re-contextualisation on blue there (prompt fidelity 0.69: 0.38 / 1.00)
        overrides.update({**EARLIER_DEFAULT, "text_encoder_2.train": True,
                          "text_encoder_2.scope": DEMO_SETTINGS["text_encoder.scope"],
                          "train.max_steps": 2 * EARLIER_DEFAULT["train.max_steps"]})
    if family == "if":  # class images from IF's own sampler: DDIM 25 leaves visible noise
        overrides.update({**PAPER_FOR_IF, "prior.scheduler": "ddpm", "prior.num_inference_steps": 100})
    if no_prior:
        overrides.update(NO_PRIOR)
    if steps is not None:
        recipe = {**DEMO_SETTINGS, **overrides}
        overrides.update({"train.max_steps": steps,
                          "train.denoiser_start_step": recipe["train.denoiser_start_step"] * steps // recipe["train.max_steps"]})
    return overrides


def demo_config(output_dir: str | Path, subject: str = "banded_heart", base_dir: str | Path = DEFAULT_BASE,
                overrides: Optional[dict[str, Any]] = None, recipe: Optional[dict[str, Any]] = None):
    """The TrainConfig the demo trains with: `recipe` (default DEMO_SETTINGS; the experiments use
    PAPER_SETTINGS) plus `overrides`, both dotted keys (e.g. {"prior.enabled": False})."""
    from ..config import build_config, dotted_to_nested

    output_dir = Path(output_dir)
    settings = {**(DEMO_SETTINGS if recipe is None else recipe), **(overrides or {})}
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
         classifier_dir: str | Path = DEFAULT_CLASSIFIER, recipe: Optional[dict[str, Any]] = None) -> dict:
    """Train `subject` into the base, write grid.png and evaluation.json under `output_dir`, return the evaluation
    (`recipe`: default DEMO_SETTINGS; PAPER_SETTINGS for the paper's)."""
    from ..train import train
    from .selection import judge_for

    t0 = time.time()
    output_dir = Path(output_dir)
    world.write_instance_images(subject, output_dir / "instance_images")
    cfg = demo_config(output_dir, subject, base_dir, overrides, recipe)
    result = train(cfg, judge=judge_for(cfg))  # train.select=best: the classifier scores checkpoints
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
        from .bar import bar_line

        print(format_table(evaluation))
        if "base" in evaluation:
            print(bar_line(evaluation["model"], evaluation["base"]))
        print(f"trained {result.steps} steps in {train_seconds:.0f} s; grid: {output_dir / 'grid.png'} "
              f"(rows: {' | '.join(prompts)}; left base, right fine-tuned)")
    return evaluation
