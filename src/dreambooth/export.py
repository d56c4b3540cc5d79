"""Write the trained model: a diffusers pipeline folder (full) or LoRA weights, plus a model card.

The output folder is directly loadable:

    full:  PipelineClass.from_pretrained(OUTPUT)
    lora:  pipe = PipelineClass.from_pretrained(BASE); pipe.load_lora_weights(OUTPUT)

with the model family's pipeline class, which the model card's snippet names.

Everything is first written to a staging folder inside OUTPUT and then swapped in through a
journal (`files.swap_in`): a kill at any moment leaves either the previous export or this one,
never a mix, once `files.finish_swap` (called by every reader of an output folder) has run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .config import ExportConfig, TrainConfig
from .errors import DreamBoothError
from .files import atomic_write_text, finish_swap, swap_in
from .interop.embeddings import save_identifier_embeddings
from .interop.exports import LORA_WEIGHTS, REPORT, verify_export, write_formats

EXPORTED = ".export.json"  # the entries the last export wrote, so the next one can replace them all


def export(comps, out: Path, trainable, lora: bool, settings: ExportConfig, card: str, config_yaml: str) -> None:
    """Write the trained model into `out`: the whole pipeline (full) or the adapters (LoRA), card and config.

    The family decides the pipeline and the LoRA layout (`ModelFamily.pipeline`, `save_lora`).
    """
    finish_swap(out)
    tmp = out / ".export-staging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora:
        comps.family.save_lora(comps, tmp, set(trainable.adapted), LORA_WEIGHTS)
        save_identifier_embeddings(comps, tmp, trainable)  # what trained outside the adapters (scope=identifier)
    else:
        rounded = {name for name, m in comps.modules.items() if any(p.dtype != torch.float32 for p in m.parameters())}
        for name in rounded:  # cast for mixed precision or bf16 weights: save full precision
            comps.modules[name].to(torch.float32)
        left_out = {} if settings.save_text_encoder else \
            {n: comps.modules.pop(n) for n in comps.family.text_encoders if n not in trainable.modules}
        try:
            comps.family.pipeline(comps).save_pretrained(tmp, safe_serialization=True)
        finally:
            comps.modules.update(left_out)
        # Frozen parts cast to the autocast dtype to save memory were rounded on the way; the files
        # they were loaded from are exact, so those go into the export instead.
        for name in rounded - set(trainable.modules) - left_out.keys():
            if (tmp / name).is_dir() and comps.source(name).is_dir():
                shutil.rmtree(tmp / name)
                shutil.copytree(comps.source(name), tmp / name)
    formats = write_formats(comps, tmp, trainable, lora, settings)  # kohya LoRA, model.safetensors
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "README.md").write_text(card)
    previous = json.loads((out / EXPORTED).read_text()) if (out / EXPORTED).is_file() else []
    # what verification may add belongs to this export too, so the next one replaces it
    later = [REPORT] + [f"{name}.unverified" for name in formats + [LORA_WEIGHTS]]
    (tmp / EXPORTED).write_text(json.dumps(sorted(p.name for p in tmp.iterdir()) + later))
    swap_in(tmp, out, stale=tuple(previous))
    if settings.verify:
        _verify(comps, out, trainable, lora)


def _verify(comps, out: Path, trainable, lora: bool) -> None:
    """Load the export back (`interop.exports.verify_export`); keep the report beside it. A file that
    does not reproduce the trained model is renamed *.unverified, so nothing loads it by accident."""
    report = verify_export(comps, out, trainable, lora)
    atomic_write_text(out / REPORT, json.dumps({"passed": not report.problems, "checks": report.checks,
                                                "problems": report.problems}, indent=2) + "\n")
    print(f"export verified: {report.summary()}" if not report.problems else "export verification FAILED")
    if report.problems:
        for name in sorted(report.failed_files):
            if (out / name).is_file():
                (out / name).replace(out / f"{name}.unverified")
        raise DreamBoothError(f"the export in {out} does not load back as trained: {'; '.join(report.problems)} "
                              f"(details in {out / REPORT}; the diffusers-format output is kept)")


def update_model_card(out: Path, card: str) -> None:
    """Rewrite README.md once the final validation grid exists (the export itself came first)."""
    atomic_write_text(out / "README.md", card)


def model_card(cfg: TrainConfig, family, final_grid: Path | None, result, out: Path, base_dir: Path | None = None) -> str:
    """The output's README.md: prompts, settings, how to load it (the family's snippet), samples.
    `base_dir`: the diffusers folder trained from (a single-file model.path's converted copy)."""
    from .interop.embeddings import EMBEDDINGS_DIR
    from .interop.exports import SINGLE_FILE
    from .interop.kohya import KOHYA_WEIGHTS

    # The card is published text (the Hub shows it): it names folders, never this machine's paths.
    concepts = cfg.resolved_concepts()
    hub_id = base_hub_id(cfg.model.path, cfg.model.hub_id, base_dir)
    base = hub_id or Path(cfg.model.path).name
    lines = [
        "---",
        "library_name: diffusers",
        *([f"base_model: {hub_id}"] if hub_id else []),  # the Hub reads a repo id here; a local base has none
        f"tags: [dreambooth, text-to-image, {family.hub_tag}" + (", lora]" if cfg.train.method == "lora" else "]"),
        "---",
        "",
        f"# DreamBooth {'LoRA' if cfg.train.method == 'lora' else 'fine-tune'} of `{base}`",
        "",
        "## Prompts",
        "",
    ]
    for c in concepts:
        lines.append(f"- instance prompt: `{c.instance_prompt}` (photos: `{Path(c.instance_dir).name}`)"
                     + (f"; class prompt: `{c.class_prompt}`" if cfg.prior.enabled else "")
                     + (f"; class images made with {len(c.class_prompts)} class prompts (`{c.class_prompts[0]}`, ...)"
                        if c.class_prompts else ""))
    lines += [
        "",
        "## Training",
        "",
        f"- method: {cfg.train.method}" + (f" (rank {cfg.lora.rank}, alpha {cfg.lora.alpha})" if cfg.train.method == "lora" else ""),
        f"- steps: {result.steps} at batch {cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} accumulation, "
        f"resolution {cfg.data.resolution}" + (f"; the denoiser frozen for the first {cfg.train.denoiser_start_step} "
                                               "steps (pivotal tuning)" if cfg.train.denoiser_start_step else ""),
        f"- optimizer: {cfg.optim.optimizer}, lr {cfg.optim.lr:g} ({cfg.optim.lr_scheduler}, {cfg.optim.warmup_steps} warmup)",
        "- text encoders trained: " + (", ".join(_text_encoder_note(name, te, cfg.optim.lr)
                                                  for name, te in cfg.text_encoders().items() if te.train) or "none"),
        f"- prior preservation: {cfg.prior.enabled}" + (_prior_note(cfg) if cfg.prior.enabled else ""),
        *([f"- knowledge preservation: weight {cfg.prior.preserve_weight:g} on {len(cfg.preservation_prompts())} prompts "
           "(targets: the base model's predictions)"] if cfg.prior.preserve_weight else []),
        f"- Min-SNR gamma: {cfg.objective.snr_gamma}; mixed precision: {cfg.memory.mixed_precision}",
        *([f"- weights: the exponential moving average of the trained weights (decay up to {cfg.ema.decay:g}, "
           f"warm-up {'on' if cfg.ema.warmup else 'off'})"] if cfg.ema.enabled else []),
        f"- preset: {cfg.preset or 'none'}; full settings in `config.yaml`",
        "",
        "## Use",
        "",
        "```python",
        *family.usage(out.name, base, cfg.train.method == "lora"),
    ]
    lines += [f'pipe.load_textual_inversion("{out.name}/{EMBEDDINGS_DIR}/{c.resolved_identifier}.safetensors")'
              for c in concepts] if cfg.train.method == "lora" and cfg.trains_identifier_embedding else []
    lines += [f'image = pipe("{concepts[0].instance_prompt}").images[0]', "```", "",
              f"or `dreambooth sample {out.name} --prompt \"{concepts[0].instance_prompt}\"`.", ""]
    single_file = base_dir is not None and Path(cfg.model.path) != Path(base_dir)
    if cfg.train.method == "lora" and not hub_id:
        lines += [f"`{base}` is the local diffusers folder trained from" + (" (the single file's diffusers copy)"
                  if single_file else "") + "; set model.hub_id to name its Hub id here.", ""]
    if single_file:
        lines += [f"Trained from the single file `{Path(cfg.model.path).name}`" + (
            "; the base above is its diffusers copy." if cfg.train.method == "lora" else "."), ""]
    if (out / KOHYA_WEIGHTS).is_file() or (cfg.train.method == "lora" and family.kohya_prefixes and not cfg.lora.use_dora):
        lines += [f"For AUTOMATIC1111 / ComfyUI: `{KOHYA_WEIGHTS}` (kohya format) in `models/Lora`"
                  + (f", and `{EMBEDDINGS_DIR}/*.safetensors` (the identifier's trained embedding, named after it) in "
                     "`embeddings`." if cfg.trains_identifier_embedding else "."), ""]
    elif cfg.export.single_file and family.single_file:
        lines += [f"For AUTOMATIC1111 / ComfyUI: `{SINGLE_FILE}` (one file, original layout) in `models/Stable-diffusion`.", ""]
    if final_grid is not None:
        lines += ["## Samples", "", f"Validation prompts {cfg.validation.prompts} with {cfg.validation.scheduler}, "
                  f"{cfg.validation.num_inference_steps} steps, seeds from {cfg.validation.seed}:", "",
                  f"![samples]({final_grid.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


def base_hub_id(path: str, setting: str | None, base_dir: Path | None = None) -> str | None:
    """The base model's Hub id where it is known: the model.hub_id `setting`, else the one huggingface_hub's
    cache spells in the path of `path` (a folder or a single file) or of its diffusers copy `base_dir`
    (HF_HOME/hub/models--ORG--NAME/snapshots/REVISION/...); None for a model that lives only here."""
    if setting:
        return setting
    for candidate in (path, base_dir):
        match = re.search(r"/models--([^/]+?)--([^/]+)/(?:snapshots|blobs)/", Path(candidate).absolute().as_posix() + "/") \
            if candidate else None
        if match:
            return f"{match[1]}/{match[2]}"
    return None


def _text_encoder_note(name: str, te, lr: float) -> str:
    """'text_encoder (lr 5e-06, the identifier embedding at 0.003, until step 200)' for the model card."""
    if te.scope == "identifier":
        parts = [f"the identifier embedding only, lr {te.resolved_identifier_lr:g}"]
    else:
        parts = [f"lr {te.lr or lr:g}"] + ([f"the identifier embedding at {te.resolved_identifier_lr:g}"]
                                           if te.resolved_identifier_lr else [])
    parts += [f"until step {te.stop_step}"] if te.stop_step is not None else []
    return f"{name} ({', '.join(parts)})"


def _prior_note(cfg) -> str:
    if cfg.prior.source == "model":
        return f" (targets: the base model's predictions on the class prompt, weight {cfg.prior.loss_weight:g})"
    return f" ({cfg.prior.num_class_images} class images, weight {cfg.prior.loss_weight:g})"
