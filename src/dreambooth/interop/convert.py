"""`dreambooth convert IN OUT`: a single file to a diffusers folder, or a diffusers folder to a single file.

Either way the result is checked before the command reports success:
- file -> folder: the folder's weights, laid out again by our tables, must equal the file's tensors
  bit for bit (so diffusers' converter and our writer agree on every key they share);
- folder -> file: diffusers' converter must read every tensor of the file and rebuild modules
  whose outputs match the folder's (to 1e-5 in fp32; within fp16 rounding for --precision fp16);
- and the result loads as a user loads it (`from_pretrained` of the folder, `from_single_file` of
  the file, offline) and renders one image (`verify.renders`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DreamBoothError
from ..models.load import detect_family
from .exports import check_single_file
from .single_file import (checkpoint_family, folder_to_single_file, is_single_file, original_state_dict, read_checkpoint,
                          saved_part, to_diffusers)
from .verify import Verification, renders, user_pipeline


def convert(src: str | Path, dst: str | Path, config: str | None = None, precision: str = "fp32",
            allow_pickle: bool = False, verify: bool = True) -> Verification:
    src, dst = Path(src), Path(dst)
    report = Verification()
    if is_single_file(src):
        if dst.suffix:
            raise DreamBoothError(f"{src} is a single file; OUT must be a folder for the diffusers copy, got {dst}")
        to_diffusers(src, dst, config, allow_pickle)
        if verify:
            fam = _check_file_to_folder(src, dst, allow_pickle, report)
            renders(report, f"{fam.pipeline_class_names[0]}.from_pretrained({dst.name})", fam, lambda: user_pipeline(fam, dst))
    elif (src / "model_index.json").is_file():
        if dst.suffix.lower() != ".safetensors":
            raise DreamBoothError(f"{src} is a diffusers folder; OUT must be a .safetensors file, got {dst}")
        folder_to_single_file(src, dst, torch.float16 if precision == "fp16" else None)
        if verify:
            check_single_file(src, dst, detect_family(src), report)
    else:
        raise DreamBoothError(f"{src} is neither a single-file checkpoint (.safetensors, .ckpt) nor a diffusers folder "
                              "(model_index.json)")
    return report


def _check_file_to_folder(src: Path, folder: Path, allow_pickle: bool, report: Verification):
    """The folder's weights laid out again equal the file's tensors; returns the file's family."""
    state, _ = read_checkpoint(src, allow_pickle)
    fam = checkpoint_family(state, src)
    again = original_state_dict(lambda part: saved_part(folder, part), fam)
    shared = set(again) & set(state)
    differ = [k for k in sorted(shared) if not torch.equal(again[k].to(state[k].dtype), state[k])]
    if not differ:
        report.checks.append(f"{len(shared)} tensors written back identically")
    else:
        report.fail(f"{len(differ)} tensor(s) changed on the way through diffusers, e.g. {differ[0]}")
    missing = sorted(set(again) - set(state))
    if missing:  # a part the file lacks (an SD 2.x text_projection, say) was filled by the config's defaults
        report.checks.append(f"{len(missing)} tensor(s) not in {src.name} (e.g. {missing[0]})")
    extra = sorted(set(state) - set(again))
    if extra:  # EMA copies, position ids, SD 2.x's unused last text layer
        report.checks.append(f"{len(extra)} tensor(s) of {src.name} belong to no part diffusers uses (e.g. {extra[0]})")
    return fam


