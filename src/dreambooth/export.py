"""Write the trained model: a diffusers pipeline folder (full) or LoRA weights, plus a model card.

The output folder is directly loadable:

    full:  StableDiffusionPipeline.from_pretrained(OUTPUT)
    lora:  pipe = StableDiffusionPipeline.from_pretrained(BASE); pipe.load_lora_weights(OUTPUT)

Everything is first written to a staging folder inside OUTPUT and then swapped in through a
journal (`files.swap_in`): a kill at any moment leaves either the previous export or this one,
never a mix, once `files.finish_swap` (called by every reader of an output folder) has run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from .config import TrainConfig, to_dict
from .files import atomic_write_text, finish_swap, swap_in

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
EXPORTED = ".export.json"  # the entries the last export wrote, so the next one can replace them all


def export(comps, cfg: TrainConfig, out: Path, trainable, final_grid: Path | None, result) -> None:
    finish_swap(out)
    tmp = out / ".export-staging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.train.method == "lora":
        _save_lora(comps, tmp, bool(trainable.text_encoder))
    else:
        for module in (comps.unet, comps.text_encoder, comps.vae):
            if module.dtype != torch.float32:  # frozen parts were cast for mixed precision; save full precision
                module.to(torch.float32)
        comps.family.pipeline(comps).save_pretrained(tmp, safe_serialization=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (tmp / "README.md").write_text(model_card(cfg, final_grid, result, out))
    previous = json.loads((out / EXPORTED).read_text()) if (out / EXPORTED).is_file() else []
    (tmp / EXPORTED).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
    swap_in(tmp, out, stale=tuple(previous))


def update_model_card(cfg: TrainConfig, out: Path, final_grid: Path | None, result) -> None:
    """Rewrite README.md once the final validation grid exists (the export itself came first)."""
    atomic_write_text(out / "README.md", model_card(cfg, final_grid, result, out))


def _save_lora(comps, folder: Path, with_text_encoder: bool) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(comps.unet, save_embedding_layers=False))
    te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(comps.text_encoder, save_embedding_layers=False)) if with_text_encoder else None
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
                                              weight_name=LORA_WEIGHTS, safe_serialization=True)


def model_card(cfg: TrainConfig, final_grid: Path | None, result, out: Path) -> str:
    concepts = cfg.resolved_concepts()
    lines = [
        "---",
        "library_name: diffusers",
        f"base_model: {cfg.model.path}",
        "tags: [dreambooth, text-to-image, stable-diffusion" + (", lora]" if cfg.train.method == "lora" else "]"),
        "---",
        "",
        f"# DreamBooth {'LoRA' if cfg.train.method == 'lora' else 'fine-tune'} of `{cfg.model.path}`",
        "",
        "## Prompts",
        "",
    ]
    for c in concepts:
        lines.append(f"- instance prompt: `{c.instance_prompt}` (photos: `{c.instance_dir}`)"
                     + (f"; class prompt: `{c.class_prompt}`" if cfg.prior.enabled else ""))
    lines += [
        "",
        "## Training",
        "",
        f"- method: {cfg.train.method}" + (f" (rank {cfg.lora.rank}, alpha {cfg.lora.alpha})" if cfg.train.method == "lora" else ""),
        f"- steps: {result.steps} at batch {cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} accumulation, "
        f"resolution {cfg.data.resolution}",
        f"- optimizer: {cfg.optim.optimizer}, lr {cfg.optim.lr:g} ({cfg.optim.lr_scheduler}, {cfg.optim.warmup_steps} warmup)",
        f"- text encoder trained: {cfg.text_encoder.train}",
        f"- prior preservation: {cfg.prior.enabled}"
        + (f" ({cfg.prior.num_class_images} class images, weight {cfg.prior.loss_weight:g})" if cfg.prior.enabled else ""),
        f"- Min-SNR gamma: {cfg.objective.snr_gamma}; mixed precision: {cfg.memory.mixed_precision}",
        f"- preset: {cfg.preset or 'none'}; full settings in `config.yaml`",
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
    ]
    if cfg.train.method == "lora":
        lines += [f'pipe = StableDiffusionPipeline.from_pretrained("{cfg.model.path}")', f'pipe.load_lora_weights("{out}")']
    else:
        lines += [f'pipe = StableDiffusionPipeline.from_pretrained("{out}")']
    lines += [f'image = pipe("{concepts[0].instance_prompt}").images[0]', "```", "",
              f"or `dreambooth sample {out} --prompt \"{concepts[0].instance_prompt}\"`.", ""]
    if final_grid is not None:
        lines += ["## Samples", "", f"Validation prompts {cfg.validation.prompts} with {cfg.validation.scheduler}, "
                  f"{cfg.validation.num_inference_steps} steps, seeds from {cfg.validation.seed}:", "",
                  f"![samples]({final_grid.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)
