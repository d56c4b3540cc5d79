"""Key tables between diffusers' layout and the original single-file layout (LDM for SD 1.x/2.x, SGM for SDXL).

AUTOMATIC1111 and ComfyUI read one `.safetensors` file whose keys follow the original training code:
the UNet under `model.diffusion_model.` (`input_blocks`, `middle_block`, `output_blocks`), the VAE
under `first_stage_model.` and the text encoders under their conditioner's prefix. The tables here
are built by walking each model's *config* (block types, layers per block), never from fixed block
counts, so they hold for any UNet shape, tiny or full; diffusers' own diffusers -> LDM script
(`for i in range(4)`) assumes SD 1.5's shape.

Every function returns {diffusers key: original key} for the module's state dict (plus, for the
few tensors whose shapes differ between layouts, a `reshape` table), and `check_bijective` makes
sure no two keys collide and none is left out.
"""

from __future__ import annotations

import re

import torch

# UNet resnet sub-layers: diffusers name -> LDM name (openaimodel.ResBlock).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# VAE resnets keep their names, except the shortcut; VAE attention is conv-based in LDM.
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _rename(keys, prefixes: list[tuple[str, str]], inner: dict[str, str] | None = None) -> dict[str, str]:
    """Map every key under one of the diffusers `prefixes` to the original prefix, renaming the
    sub-layer right after it through `inner` (a resnet's norm1 -> in_layers.0, ...)."""
    table = {}
    for key in keys:
        for new, old in prefixes:
            if key.startswith(new + "."):
                rest = key[len(new) + 1:]
                if inner:
                    for d, o in inner.items():
                        if rest.startswith(d + "."):
                            rest = o + rest[len(d):]
                            break
                table[key] = f"{old}.{rest}"
                break
    return table


def unet_table(config, keys) -> dict[str, str]:
    """diffusers UNet2DConditionModel keys -> openaimodel.UNetModel keys (without `model.diffusion_model.`)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _per_block(config["layers_per_block"], len(down))
    resnets, attentions, plain = [], [], [
        ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),  # SDXL's size/pool embedding
        ("class_embedding", "label_emb"),  # an upscaler's noise-level embedding
        ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    i = 1  # input_blocks.0 is conv_in; then each layer, then the downsampler, in order
    for b, kind in enumerate(down):
        for j in range(layers[b]):
            resnets.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0"))
            if kind.startswith("CrossAttn"):
                attentions.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1"))
            i += 1
        if b < len(down) - 1:
            plain.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{i}.0.op"))
            i += 1
    resnets += [("mid_block.resnets.0", "middle_block.0"), ("mid_block.resnets.1", "middle_block.2")]
    attentions.append(("mid_block.attentions.0", "middle_block.1"))
    up_layers = list(reversed(layers))
    o = 0  # output_blocks: each up layer is resnet (.0), attention (.1), and the last one the upsampler
    for b, kind in enumerate(up):
        has_attention = kind.startswith("CrossAttn")
        for j in range(up_layers[b] + 1):
            resnets.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{o}.0"))
            if has_attention:
                attentions.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{o}.1"))
            if j == up_layers[b] and b < len(up) - 1:
                plain.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{o}.{2 if has_attention else 1}"))
            o += 1
    table = _rename(keys, resnets, _UNET_RESNET)
    table.update(_rename(keys, attentions))  # SpatialTransformer keeps diffusers' inner names
    table.update(_rename(keys, plain))
    return table


def vae_table(config, keys) -> tuple[dict[str, str], set[str]]:
    """diffusers AutoencoderKL keys -> LDM AutoencoderKL keys (without `first_stage_model.`), and the
    keys whose weights are 1x1 convolutions in LDM but linear layers in diffusers (the attention)."""
    n, per = len(config["down_block_types"]), config["layers_per_block"]
    plain = [("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out"),
             ("encoder.conv_in", "encoder.conv_in"), ("encoder.conv_out", "encoder.conv_out"),
             ("decoder.conv_in", "decoder.conv_in"), ("decoder.conv_out", "decoder.conv_out"),
             ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    resnets = [(f"{c}.mid_block.resnets.{j}", f"{c}.mid.block_{j + 1}") for c in ("encoder", "decoder") for j in (0, 1)]
    for b in range(n):
        resnets += [(f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}") for j in range(per)]
        plain.append((f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"))
        # LDM's decoder counts its levels from the bottom (up.0 runs last); each has one resnet more
        resnets += [(f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{n - 1 - b}.block.{j}") for j in range(per + 1)]
        plain.append((f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{n - 1 - b}.upsample.conv"))
    table = _rename(keys, resnets, _VAE_RESNET)
    table.update(_rename(keys, plain))
    attn = _rename(keys, [(f"{c}.mid_block.attentions.0", f"{c}.mid.attn_1") for c in ("encoder", "decoder")],
                   _VAE_ATTENTION)
    table.update(attn)
    return table, {k for k in attn if k.endswith(".weight") and ".group_norm." not in k}


def clip_table(keys, flattened: bool) -> dict[str, str]:
    """transformers CLIPTextModel(WithProjection) keys -> OpenAI CLIP keys as LDM's FrozenCLIPEmbedder holds
    them (`transformer.text_model....`): the same names, under `text_model.` (which transformers >= 5.6
    drops from CLIPTextModel)."""
    return {k: f"transformer.{'text_model.' if flattened else ''}{k}" for k in keys}


def open_clip_table(keys, flattened: bool) -> tuple[dict[str, str], dict[str, list[str]]]:
    """transformers CLIP text keys -> OpenCLIP keys (`model.transformer.resblocks.N...`), as SD 2.x and
    SDXL's second encoder hold them. OpenCLIP fuses q/k/v into one `in_proj`, so those come back as
    {open_clip key: [q, k, v diffusers keys]} to be concatenated; `text_projection` is transposed."""
    plain = {"embeddings.token_embedding.weight": "model.token_embedding.weight",
             "embeddings.position_embedding.weight": "model.positional_embedding",
             "final_layer_norm.weight": "model.ln_final.weight", "final_layer_norm.bias": "model.ln_final.bias",
             "text_projection.weight": "model.text_projection"}
    inner = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    table, fused = {}, {}
    for key in keys:
        bare = key if flattened else key.removeprefix("text_model.")
        if bare in plain:
            table[key] = plain[bare]
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", bare)
        if not m:
            continue
        layer, name, kind = m.groups()
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            slot = fused.setdefault(f"model.transformer.resblocks.{layer}.attn.in_proj_{kind}", [None] * 3)
            slot["qkv".index(name[-6])] = key
        elif name in inner:
            table[key] = f"model.transformer.resblocks.{layer}.{inner[name]}.{kind}"
    return table, fused


def check_bijective(table: dict[str, str], keys, what: str) -> None:
    """Every key mapped, and no two onto the same original key (a silent overwrite would lose a tensor)."""
    missing = sorted(set(keys) - set(table))
    if missing:
        raise ValueError(f"{what}: no single-file name for {len(missing)} key(s), e.g. {missing[:3]}")
    seen: dict[str, str] = {}
    for new, old in table.items():
        if old in seen:
            raise ValueError(f"{what}: {new} and {seen[old]} both map to {old}")
        seen[old] = new


def is_flattened(module) -> bool:
    """CLIPTextModel's state dict lost its `text_model.` level in transformers 5.6; WithProjection kept it."""
    return not any(k.startswith("text_model.") for k in module.state_dict())


OPEN_CLIP_ACTIVATION = "gelu"  # OpenCLIP text towers (SD 2.x's ViT-H, SDXL's bigG); OpenAI's CLIP ViT-L: quick_gelu


def uses_open_clip(text_config) -> bool:
    """Whether a CLIP text config is an OpenCLIP tower (by its activation, `OPEN_CLIP_ACTIVATION`)."""
    return text_config.hidden_act == OPEN_CLIP_ACTIVATION


TABLES = ("unet", "vae", "text")


def to_original(prefix: str, module, kind: str) -> dict[str, torch.Tensor]:
    """One module's state dict in the original layout, under `prefix`. kind, the table a family declares for
    the part (`ModelFamily.single_file_tables`): unet (LDM's openaimodel UNet) | vae (LDM's AutoencoderKL) |
    text (a CLIP text encoder, OpenAI's or OpenCLIP's, told apart by its config)."""
    if kind not in TABLES:
        raise ValueError(f"no single-file table {kind!r} for {module.__class__.__name__}; known: {', '.join(TABLES)}")
    state = module.state_dict()
    keys, fused, convs = list(state), {}, set()
    if kind == "unet":
        table = unet_table(module.config, keys)
    elif kind == "vae":
        table, convs = vae_table(module.config, keys)
    elif uses_open_clip(module.config):
        table, fused = open_clip_table(keys, is_flattened(module))
    else:
        table = clip_table(keys, is_flattened(module))
    in_fused = {k for parts in fused.values() for k in parts}
    check_bijective(table, [k for k in keys if k not in in_fused], f"{module.__class__.__name__} under {prefix}")
    out = {prefix + old: torch.cat([state[k] for k in parts]) for old, parts in fused.items()}
    for key, old in table.items():
        value = state[key]
        if key in convs:
            value = value[:, :, None, None]  # linear -> 1x1 convolution
        elif old == "model.text_projection":
            value = value.T  # OpenCLIP multiplies x @ P; transformers' Linear holds P transposed
        out[prefix + old] = value.contiguous()
    return out
