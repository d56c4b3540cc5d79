"""LoRA in the kohya / AUTOMATIC1111 format (`lora_unet_...`, `lora_te_...`, with `.alpha` keys).

The conversion is diffusers' `convert_state_dict_to_kohya` (peft -> kohya key names), with three
corrections it does not make itself:
- `.alpha`: diffusers writes the rank there; kohya scales by alpha / rank, so a LoRA trained with
  alpha != rank needs the real alpha (peft's `lora_alpha`, per layer where an alpha_pattern says so).
- A model with one text encoder names it `lora_te_` (kohya's SD 1.x/2.x prefix), not `lora_te1_`.
- transformers >= 5.6 dropped `text_model.` from CLIPTextModel's names; kohya's keys keep it.
"""

from __future__ import annotations

from pathlib import Path

import torch

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"


def kohya_state_dict(modules: dict, names: list[str], text_encoders: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The adapters of `modules[name]` for each trained name, as one kohya-format state dict."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    from .layout import is_flattened

    peft_state, alphas = {}, {}
    for name in names:
        module = modules[name]
        config = module.peft_config["default"]
        flat = name in text_encoders and is_flattened(module)
        for key, value in get_peft_model_state_dict(module, save_embedding_layers=False).items():
            key = f"text_model.{key}" if flat else key
            peft_state[f"{name}.{key}"] = value
            if ".lora_A." in key:
                layer = key.split(".lora_A.")[0]
                alpha = next((a for pat, a in config.alpha_pattern.items() if layer.endswith(pat)), config.lora_alpha)
                alphas[f"{name}.{layer}"] = float(alpha)
    kohya = convert_state_dict_to_kohya(peft_state)
    single_te = len(text_encoders) == 1  # SD 1.x/2.x: lora_te_; SDXL: lora_te1_, lora_te2_
    out = {}
    for key, value in kohya.items():
        if single_te:
            key = key.replace("lora_te1_", "lora_te_")
        out[key] = value
    # diffusers wrote alpha = rank; put back the alpha the adapters were trained with
    for layer, alpha in alphas.items():
        name, rest = layer.split(".", 1)
        prefix = {"unet": "lora_unet"}.get(name) or (
            "lora_te" if single_te else f"lora_te{text_encoders.index(name) + 1}")
        key = f"{prefix}_{rest.replace('.', '_')}.alpha"
        if key not in out:
            raise KeyError(f"kohya conversion lost {key}")
        out[key] = torch.tensor(alpha)
    return out


def save_kohya(modules: dict, names: list[str], text_encoders: tuple[str, ...], path: Path) -> Path:
    from safetensors.torch import save_file

    state = kohya_state_dict(modules, names, text_encoders)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}, str(tmp), metadata={"ss_network_module": "networks.lora", "format": "pt"})
    tmp.replace(path)
    return path
