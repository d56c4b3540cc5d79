"""Memory and speed switches: gradient checkpointing, the attention kernel, memory format, compile.

Each is opt-in and named for what it does (STYLE rule 12). Latent and text-embedding caching live
in the training recipe because they change what the loop feeds the model, not the model.
"""

from __future__ import annotations

import torch

from ..config import MemoryConfig
from ..errors import DreamBoothError
from .family import Components


def apply_memory_options(comps: Components, memory: MemoryConfig, trained: list[str]) -> None:
    """Switch on the memory options for the denoiser and the `trained` text encoders."""
    unet = comps.denoiser
    if memory.gradient_checkpointing:
        # Recompute activations in the backward pass instead of storing them.
        unet.enable_gradient_checkpointing()
        if memory.checkpoint_levels:
            keep_stored = _low_resolution_blocks(unet, memory.checkpoint_levels)
            for block in keep_stored:
                for module in block.modules():
                    if hasattr(module, "gradient_checkpointing"):
                        module.gradient_checkpointing = False
        for name in trained:
            if name in comps.family.text_encoders:
                comps.modules[name].gradient_checkpointing_enable()
    if memory.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise DreamBoothError("memory.attention=xformers needs xFormers: pip install xformers (CUDA), "
                                  "or use memory.attention=sdpa, which is as memory-efficient on PyTorch >= 2") from None
        unet.enable_xformers_memory_efficient_attention()
    if memory.attention == "classic":
        # The textbook attention: softmax(QK^T)V with the whole token-by-token matrix in memory
        # (at 512 px, 4096 x 4096 per head at the highest level). Kept to measure what SDPA saves.
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    # "sdpa": diffusers' default attention processor already calls torch's scaled_dot_product_attention.
    if memory.channels_last:
        # NHWC weights; convolutions then produce NHWC activations (tensor-core friendly on GPUs).
        unet.to(memory_format=torch.channels_last)
    if memory.compile_unet:
        # In place (nn.Module.compile): the module keeps its class, parameter names and save_pretrained.
        unet.compile()


def _low_resolution_blocks(unet, levels: int) -> list[torch.nn.Module]:
    """The UNet blocks below the `levels` highest resolutions: they keep their activations.

    A UNet's activation memory is dominated by its high-resolution levels (4x the pixels per level
    up), so checkpointing only those saves most of the memory for part of the recompute.
    """
    n = len(unet.down_blocks)
    if not 0 < levels <= n:
        raise DreamBoothError(f"memory.checkpoint_levels={levels} must be between 1 and the UNet's {n} levels (0 = all)")
    # up_blocks run lowest resolution first: up_blocks[i] mirrors down_blocks[n - 1 - i]
    return [*unet.down_blocks[levels:], unet.mid_block, *unet.up_blocks[: n - levels]]
