"""Complete, atomic, resumable training checkpoints.

A checkpoint is a folder `OUTPUT/checkpoints/step-000400/` holding everything a run needs to
continue as if it had never stopped:

    trainable.safetensors   the trainable weights only (all UNet weights, or just the adapters)
    optimizer.pt            optimizer state
    ema.safetensors         the moving average of the trainable weights (ema.enabled only)
    training_state.pt       LR schedule, the noise/timestep generator, torch/numpy/python RNG states
    state.json              step, base-model fingerprint, the drift probe's metrics (human readable)
    config.yaml             the resolved configuration

It is written to a temporary folder and renamed into place, so a crash never leaves a half
checkpoint, and `checkpoints/latest.json` (also replaced atomically) names the newest one, as
k-diffusion's `*_state.json` does; with `train.select=best`, `checkpoints/best.json` names the
best-scoring one, which rotation keeps. Resume refuses a different base model or settings that would
change what the remaining steps compute.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from .config import TEXT_ENCODER_SECTIONS, TrainConfig, deep_merge, to_dict
from .errors import DreamBoothError
from .files import atomic_folder, atomic_write_text

# Settings that must not change between a run and its resume: each changes what the remaining
# steps compute or which weights exist. Others (max_steps, checkpoint/validation cadence,
# output formatting) may change.
MUST_MATCH = (
    "model.family", "concept", "concepts", "data", "prior.enabled", "prior.source", "prior.num_class_images", "prior.loss_weight",
    "prior.preserve_prompts", "prior.preserve_weight", "prior.base_sample_steps",
    "lora", *TEXT_ENCODER_SECTIONS, "model.vae_path", "optim.optimizer", "optim.lr", "optim.beta1",
    "optim.beta2", "optim.weight_decay", "optim.eps", "optim.lr_scheduler", "optim.warmup_steps", "optim.max_grad_norm",
    "objective", "train.method", "train.batch_size", "train.gradient_accumulation_steps", "train.seed",
    "memory.mixed_precision", "memory.weights_dtype", "optim.moments_dtype", "optim.fused_backward", "ema",
    # best.json's scores must stay comparable across the resume
    "monitor.probe_size", "monitor.seed", "monitor.fit_ratio",
)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    pointer = checkpoints_root(output_dir) / "latest.json"
    if not pointer.is_file():
        return None
    path = checkpoints_root(output_dir) / json.loads(pointer.read_text())["checkpoint"]
    if not path.is_dir():
        raise DreamBoothError(f"{pointer} points at {path}, which does not exist; delete {pointer} to start over")
    return path


def save_checkpoint(output_dir, step: int, trainable, optimizer, lr_scheduler, generator: torch.Generator,
                    resolved: dict, keep: int, model_fingerprint: str, ema=None, metrics: dict | None = None,
                    score: float | None = None) -> Path:
    """Write step `step`'s checkpoint; `resolved` is the run's whole configuration (to_dict), kept for resume.

    `ema`: the run's `ema.WeightAverage`, saved when enabled. `metrics` (the drift probe's) go into
    state.json. A `score` (train.select=best; lower is better) that beats best.json's makes this
    checkpoint the best one, which rotation then never deletes."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_folder(final) as tmp:  # a kill mid-save never leaves a half checkpoint for resume to find
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.named().items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        ema_weights, ema_updates = ema.state_dict() if ema is not None else ({}, {})
        if ema_weights:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_weights.items()}, tmp / "ema.safetensors")
        torch.save({
            "lr_scheduler": lr_scheduler.state_dict(),
            "generator": generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "ema_updates": ema_updates,
        }, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "model_fingerprint": model_fingerprint, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             **({"metrics": metrics} if metrics is not None else {})}, indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    best = _read_best(root)
    if score is not None and (best is None or score < best["score"] or best["step"] == step):
        atomic_write_text(root / "best.json", json.dumps({"checkpoint": final.name, "step": step, "score": score}) + "\n")
    atomic_write_text(root / "latest.json", json.dumps({"checkpoint": final.name, "step": step}) + "\n")
    _rotate(root, keep)
    return final


def _read_best(root: Path) -> dict | None:
    path = root / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def best_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint best.json names (train.select=best), or None if no checkpoint has scored."""
    best = _read_best(checkpoints_root(output_dir))
    return None if best is None else checkpoints_root(output_dir) / best["checkpoint"]


def _rotate(root: Path, keep: int) -> None:
    """Delete the oldest checkpoints beyond `keep` (names sort by step), except the best one (best.json)."""
    best = _read_best(root)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        if best is None or old.name != best["checkpoint"]:
            shutil.rmtree(old)


def check_resume_compatible(checkpoint: Path, cfg: TrainConfig, model_fingerprint: str) -> int:
    """Raise, naming every reason, if `cfg` cannot continue `checkpoint`; return its step."""
    state = json.loads((checkpoint / "state.json").read_text())
    # Settings added since the checkpoint was written count as their defaults.
    saved = deep_merge(to_dict(TrainConfig()), yaml.safe_load((checkpoint / "config.yaml").read_text()))
    now = to_dict(cfg)
    reasons = []
    if state["model_fingerprint"] != model_fingerprint:
        reasons.append(f"the base model's weights differ (checkpoint made from {saved['model']['path']})")
    for key in MUST_MATCH:
        if _get(saved, key) != _get(now, key):
            reasons.append(f"{key} changed from {_get(saved, key)!r} to {_get(now, key)!r}")
    if reasons:
        raise DreamBoothError(f"cannot resume from {checkpoint}: " + "; ".join(reasons) +
                              ". Use the original settings, or a new train.output_dir to start over")
    if state["step"] >= cfg.train.max_steps:
        raise DreamBoothError(f"{checkpoint} is already at step {state['step']} >= train.max_steps={cfg.train.max_steps}; "
                              "raise train.max_steps to train further")
    return state["step"]


def load_weights(checkpoint: Path, trainable) -> None:
    """Copy a checkpoint's trainable weights into the model, in place."""
    weights = load_file(checkpoint / "trainable.safetensors")
    named = trainable.named()
    if set(weights) != set(named):
        raise DreamBoothError(f"{checkpoint / 'trainable.safetensors'} does not match this model's trainable weights")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(weights[name])


def load_checkpoint(checkpoint: Path, trainable, optimizer, lr_scheduler, generator: torch.Generator, ema=None) -> None:
    """Restore weights, optimizer, schedule, every RNG and the weights' moving average (`ema`) in place."""
    load_weights(checkpoint, trainable)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=False)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if ema is not None and ema.enabled:  # MUST_MATCH["ema"]: a checkpoint of an EMA run has the file
        averages = load_file(checkpoint / "ema.safetensors")
        if set(averages) != set(trainable.named()):
            raise DreamBoothError(f"{checkpoint / 'ema.safetensors'} does not match this model's trainable weights")
        ema.load_state_dict(averages, state["ema_updates"])
