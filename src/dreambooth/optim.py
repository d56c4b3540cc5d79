"""Optimizer and learning-rate schedule factories (plain if/elif, as k-diffusion's factories are)."""

from __future__ import annotations

import torch

from .config import TrainConfig
from .errors import DreamBoothError


def build_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """param_groups: [{"params": [...], "lr": ...}, ...] (UNet, then the text encoder with its own lr)."""
    o = cfg.optim
    name = o.optimizer
    if name == "adamw":
        # The fused kernel (CPU and CUDA) does the whole update in one pass over each tensor: measured
        # 4.2x faster than the default per-tensor loop on CPU (bench/RESULTS.md), same maths.
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)
        try:
            return torch.optim.AdamW(param_groups, fused=True, **kwargs)
        except RuntimeError:  # a device or dtype without the fused kernel
            return torch.optim.AdamW(param_groups, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DreamBoothError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes "
                                  "(CUDA GPUs), or use optim.optimizer=adamw") from None
        if not torch.cuda.is_available():
            raise DreamBoothError("optim.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit states live on the GPU); "
                                  "on this machine use optim.optimizer=adamw or adafactor")
        return bnb.optim.AdamW8bit(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, eps=o.eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # External learning rate (the schedule drives it), not Adafactor's own relative step size.
        return Adafactor(param_groups, lr=o.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=o.weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise DreamBoothError("optim.optimizer=prodigy needs prodigyopt: pip install prodigyopt") from None
        # Prodigy estimates the step size itself; its authors recommend lr=1.0.
        return Prodigy(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if name == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise DreamBoothError("optim.optimizer=lion needs lion-pytorch: pip install lion-pytorch") from None
        return Lion(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    raise DreamBoothError(f"unknown optim.optimizer {name!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """diffusers' get_scheduler; stepped once per optimizer step (not per micro-batch or per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.train.max_steps)
