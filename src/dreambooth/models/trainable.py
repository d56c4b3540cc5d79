"""Decide what trains: all UNet weights or LoRA adapters (peft), and optionally the text encoder.

Full fine-tuning and LoRA share the whole recipe; they differ only here and in what `export`
writes. LoRA layers are peft's (`LoraConfig` + diffusers' `add_adapter`), never our own. Adapters
use peft's "gaussian" init for A and zeros for B, so the adapted model's output equals the base
model's output at step 0 (Hu et al. 2021, LoRA: W0 x + (alpha / r) B A x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig
from .load import Components


@dataclass
class Trainable:
    """Parameters the optimizer updates, grouped by module, with stable names for checkpoints."""

    unet: dict[str, torch.nn.Parameter]
    text_encoder: dict[str, torch.nn.Parameter]

    def named(self) -> dict[str, torch.nn.Parameter]:
        return {**{f"unet.{k}": v for k, v in self.unet.items()},
                **{f"text_encoder.{k}": v for k, v in self.text_encoder.items()}}

    def count(self) -> int:
        return sum(p.numel() for p in self.named().values())


def _lora_config(cfg: TrainConfig, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      init_lora_weights="gaussian", target_modules=list(targets))


def setup_trainable(comps: Components, cfg: TrainConfig) -> Trainable:
    """Unfreeze (full) or add adapters to (lora) the UNet and, if asked, the text encoder.

    Trainable weights are kept in fp32 even under mixed precision: fp16/bf16 cannot represent
    DreamBooth-sized updates (an lr of 1e-6 moves a weight far less than bf16's resolution) when
    they are rounded to nearest. memory.weights_dtype=bf16 stores the trained models (UNet, and the
    text encoder when it trains) in bf16 instead, and the optimizer adds each update with
    stochastic rounding (bf16_adamw.py), which keeps those updates in expectation.
    """
    lora = cfg.train.method == "lora"
    dtype = torch.bfloat16 if cfg.memory.weights_dtype == "bf16" else torch.float32
    if dtype != torch.float32:
        comps.unet.to(dtype)
        if cfg.text_encoder.train:
            comps.text_encoder.to(dtype)
    if lora:
        comps.unet.add_adapter(_lora_config(cfg, cfg.lora.unet_targets))
    else:
        comps.unet.requires_grad_(True)
    if cfg.text_encoder.train:
        if lora:
            comps.text_encoder.add_adapter(_lora_config(cfg, cfg.lora.text_encoder_targets))
        else:
            comps.text_encoder.requires_grad_(True)
    unet = {n: p for n, p in comps.unet.named_parameters() if p.requires_grad}
    text_encoder = {n: p for n, p in comps.text_encoder.named_parameters() if p.requires_grad}
    for p in list(unet.values()) + list(text_encoder.values()):
        p.data = p.data.to(dtype)
    return Trainable(unet, text_encoder)


def freeze_text_encoder(comps: Components, trainable: Trainable) -> None:
    """Stop training the text encoder (text_encoder.stop_step): no grads, so the optimizer skips it."""
    for p in trainable.text_encoder.values():
        p.requires_grad_(False)
        p.grad = None
