"""LoRA in the kohya / AUTOMATIC1111 format (`lora_unet_...`, `lora_te_...`, with `.alpha` keys).

Each trained module's peft adapters are renamed the way kohya's sd-scripts names them: the family's
prefix for the module (`ModelFamily.kohya_prefixes`: lora_unet, lora_te for SD 1.x/2.x's one text
encoder, lora_te1/lora_te2 for SDXL's two), then the layer's path with `_` for `.`, then
`.lora_down.weight` / `.lora_up.weight` (peft's lora_A / lora_B) and `.alpha`. Two facts a plain
renaming misses:
- `.alpha`: kohya scales by alpha / rank, so a LoRA trained with alpha != rank needs the real alpha
  (peft's `lora_alpha`, per layer where an alpha_pattern says so);
- transformers >= 5.6 dropped `text_model.` from CLIPTextModel's names; kohya's keys keep it.
diffusers' `load_lora_weights` reads the file back in verification (`exports.verify_export`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import atomic_file

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
_PEFT_TO_KOHYA = {"lora_A": "lora_down", "lora_B": "lora_up"}


def kohya_state_dict(modules: dict, names: list[str], fam) -> dict[str, torch.Tensor]:
    """The adapters of `modules[name]` for each trained name, as one kohya-format state dict, under the
    family's prefixes (`ModelFamily.kohya_prefixes`)."""
    from peft.utils import get_peft_model_state_dict

    from .layout import is_flattened

    out = {}
    for name in names:
        module = modules[name]
        config = module.peft_config["default"]
        flat = name in fam.text_encoders and is_flattened(module)
        for key, value in get_peft_model_state_dict(module, save_embedding_layers=False).items():
            layer, kind, rest = _split(f"text_model.{key}" if flat else key, name)
            stem = f"{fam.kohya_prefixes[name]}_{layer.replace('.', '_')}"
            out[f"{stem}.{_PEFT_TO_KOHYA[kind]}.{rest}"] = value
            if kind == "lora_A":  # diffusers' loader, like kohya's, scales by alpha / rank
                alpha = next((a for pat, a in config.alpha_pattern.items() if layer.endswith(pat)), config.lora_alpha)
                out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


def _split(key: str, module: str) -> tuple[str, str, str]:
    """'down_blocks.0.attn.to_q.lora_A.weight' -> ('down_blocks.0.attn.to_q', 'lora_A', 'weight')."""
    for kind in _PEFT_TO_KOHYA:
        if f".{kind}." in key:
            layer, rest = key.split(f".{kind}.")
            return layer, kind, rest
    raise KeyError(f"{module}: adapter key {key} is neither lora_A nor lora_B; kohya's format has no place for it")


def save_kohya(modules: dict, names: list[str], fam, path: Path) -> Path:
    from safetensors.torch import save_file

    state = kohya_state_dict(modules, names, fam)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in state.items()}, str(tmp), metadata={"ss_network_module": "networks.lora", "format": "pt"})
    return path
