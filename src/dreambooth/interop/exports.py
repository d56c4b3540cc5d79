"""The A1111/ComfyUI formats of an export, and the check that every format loads back as trained.

`write_formats` adds them to the staged export folder: a kohya-format copy of a LoRA, and (with
export.single_file) a full fine-tune as one original-layout file, built part by part from the
diffusers folder just written, so frozen parts are their exact source weights.

`verify_export` reloads each file through a path that is not ours (diffusers' `from_single_file`
converters, `load_lora_weights`), counts tensors no converter read and parameters none filled,
compares network outputs with the trained modules (`verify.compare`), and has the family's pipeline
class load the output as its model card says and render one image (`verify.renders`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .embeddings import EMBEDDINGS_DIR, embedding_encoder, encoded, load_identifier_embeddings
from .kohya import KOHYA_WEIGHTS, save_kohya
from .single_file import TrackedDict, folder_to_single_file, load_part_from, read_checkpoint, saved_part
from .verify import FP32, HALF, Verification, compare, renders, same_weights, tolerance, user_pipeline

SINGLE_FILE = "model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
REPORT = "verification.json"


def write_formats(comps, folder: Path, trainable, lora: bool, settings) -> list[str]:
    """Write the single-file formats the family has into `folder` (a staged export); their names."""
    fam = comps.family
    if lora:
        if not fam.kohya_prefixes or is_dora(comps.denoiser):  # diffusers reads our dora_scale keys back wrongly
            return []
        save_kohya(comps.modules, sorted(trainable.adapted), fam, folder / KOHYA_WEIGHTS)
        return [KOHYA_WEIGHTS]
    if settings.single_file and fam.single_file:
        dtype = torch.float16 if settings.single_file_precision == "fp16" else None
        folder_to_single_file(folder, folder / SINGLE_FILE, dtype)
        return [SINGLE_FILE]
    return []


def is_dora(module) -> bool:
    """Whether `module`'s adapters are DoRA (peft's use_dora)."""
    config = getattr(module, "peft_config", {}).get("default")
    return bool(config is not None and config.use_dora)


def verify_export(comps, out: Path, trainable, lora: bool) -> Verification:
    """Load what `out` holds back through diffusers and compare it with the trained modules."""
    report = Verification()
    if lora:
        _verify_lora(comps, out, trainable, report)
    else:
        _verify_full(comps, out, trainable, report)
    return report


def _verify_lora(comps, out: Path, trainable, report: Verification) -> None:
    fam = comps.family
    # the base as a user loads it, then the LoRA (and the identifier's embeddings) on it: one image
    base = user_pipeline(fam, comps.model_dir, **_replaced_parts(comps))
    with_embeddings = embedding_encoder(trainable) is not None
    renders(report, f"{LORA_WEIGHTS} on {fam.pipeline_class_names[0]}.from_pretrained(base)", fam,
            lambda: _with_lora(base, out, with_embeddings), LORA_WEIGHTS)
    base.unload_lora_weights()
    if with_embeddings:
        base.unload_textual_inversion()
    # The fresh base in the trained model's precision, but on the CPU: a second copy on the GPU could
    # take a run that fitted its memory budget over it, after the model was written.
    for part in trainable.modules:
        frozen = next(p for n, p in comps.modules[part].named_parameters() if "lora_" not in n)
        getattr(base, part)._apply(lambda t: t.to(frozen.dtype) if t.is_floating_point() else t)
    for file in [LORA_WEIGHTS] + ([KOHYA_WEIGHTS] if (out / KOHYA_WEIGHTS).is_file() else []):
        try:
            base.load_lora_weights(out, weight_name=file)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            report.fail(f"{file}: load_lora_weights failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file)
            continue
        for part in sorted(trainable.adapted):
            compare(report, f"{file} {part}", fam, part, comps.modules[part], getattr(base, part),
                    tolerance(comps.modules[part], getattr(base, part)), file)
        base.unload_lora_weights()
    _verify_embeddings(comps, out, trainable, base, report)


def _with_lora(pipe, out: Path, with_embeddings: bool):
    """`pipe` with the LoRA output `out` loaded as its model card says: the adapters, then the embeddings."""
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS)
    if with_embeddings:
        load_identifier_embeddings(pipe, out)
    return pipe


def _replaced_parts(comps) -> dict:
    """The parts trained from another folder than the base's (model.vae_path), loaded from there for the
    user's pipeline, by the class the base's model_index.json names."""
    import importlib

    if not comps.sources:
        return {}
    index = json.loads((comps.model_dir / "model_index.json").read_text())
    return {name: getattr(importlib.import_module(index[name][0]), index[name][1]).from_pretrained(path)
            for name, path in comps.sources.items()}


def _verify_embeddings(comps, out: Path, trainable, base, report: Verification) -> None:
    """Each identifier's textual-inversion file, loaded by diffusers into a fresh base: a prompt with the
    identifier encodes as the trained text encoder encodes it."""
    encoder = embedding_encoder(trainable)
    if encoder is None:
        return
    trained = comps.family.pipeline(comps)
    limit = tolerance(comps.modules[encoder], getattr(base, encoder))
    for word in trainable.identifiers:
        file = f"{EMBEDDINGS_DIR}/{word}.safetensors"
        try:
            base.load_textual_inversion(str(out / file))
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            report.fail(f"{file}: load_textual_inversion failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file)
            continue
        prompt = f"a photo of {word}"
        reference, loaded = encoded(trained, prompt), encoded(base, prompt)
        scale = max(1.0, reference.abs().max().item())
        report.add(f"{file} {encoder} ({prompt!r})", (reference - loaded).abs().max().item(), limit * scale, file)
        base.unload_textual_inversion()


def _verify_full(comps, out: Path, trainable, report: Verification) -> None:
    fam = comps.family
    for part in sorted(trainable.modules):  # the diffusers folder holds what was trained
        # the same class and config wrote and read it: equal weights are the whole check
        same_weights(report, f"{part}/ (diffusers folder)", comps.modules[part], saved_part(out, part), part)
    renders(report, f"{fam.pipeline_class_names[0]}.from_pretrained(output)", fam, lambda: user_pipeline(fam, out))
    if (out / SINGLE_FILE).is_file():
        check_single_file(out, out / SINGLE_FILE, fam, report)


def check_single_file(folder: Path, path: Path, fam, report: Verification) -> None:
    """`path` (a single file made from the diffusers `folder`) read back by diffusers' converters:
    every tensor read, every part rebuilt, and each part's outputs those of the folder's."""
    state, _ = read_checkpoint(path)
    half = any(v.dtype == torch.float16 for v in state.values())
    tracked = TrackedDict(state)
    index = json.loads((folder / "model_index.json").read_text())
    for part in fam.single_file:
        try:
            from_file = load_part_from(tracked, folder, part, index[part][1], torch.float32)
        except Exception as e:  # noqa: BLE001 - a part diffusers cannot rebuild is the finding
            report.fail(f"{path.name} {part}: {str(e).splitlines()[0]}", path.name)
            continue
        compare(report, f"{path.name} {part}", fam, part, saved_part(folder, part), from_file, HALF if half else FP32,
                path.name)
    unread = sorted(set(state) - tracked.read)
    if unread:
        report.fail(f"{path.name}: {len(unread)} tensor(s) no converter read, e.g. {unread[0]}", path.name)
    else:
        report.checks.append(f"{path.name}: all {len(state)} tensors read")
    renders(report, f"{path.name} through {fam.pipeline_class_names[0]}.from_single_file", fam,
            lambda: user_pipeline(fam, folder, path), path.name)
