"""What the loop feeds the denoiser for a batch: clean latents and text tensors, cached when they cannot change.

Each image is encoded once (its VAE posterior) when nothing about it changes during training (no
random crops or flips), and each distinct prompt once when no text encoder trains. Otherwise they
are encoded per batch. Either way the family does the encoding, so the cache works for any family:
whatever `encode_images` and `encode_prompt` return is what is stored.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data.dataset import Batch, DreamBoothData
from .models.family import Components


class Latents:
    """Clean latents x0 for a batch (N, C, H/f, W/f), sampled from each image's VAE posterior."""

    def __init__(self, comps: Components, data: DreamBoothData, cache: bool, device, progress: bool = True):
        self.comps, self.device = comps, device
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        if cache:
            keys = [("subject", i) for i in range(len(data.subject))] + [("class", i) for i in range(len(data.klass))]
            self.cache = {}
            with torch.no_grad():
                for kind, i in tqdm(keys, desc="caching latents", disable=not progress, leave=False):
                    mean, std = comps.family.encode_images(comps, data.pixels(kind, i)[None])
                    self.cache[(kind, i)] = (mean[0], std[0])

    @property
    def needs_pixels(self) -> bool:
        return self.cache is None

    def __call__(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        if self.cache is not None:
            mean = torch.stack([self.cache[k][0] for k in batch.indices])
            std = torch.stack([self.cache[k][1] for k in batch.indices])
        else:
            with torch.no_grad():
                mean, std = self.comps.family.encode_images(self.comps, batch.pixels.to(self.device))
        return self.comps.family.latents_from(self.comps, mean.float(), std.float(), generator)


class Texts:
    """Text tensors for a batch (whatever the family's encode_prompt returns, first dimension N)."""

    def __init__(self, comps: Components, data: DreamBoothData, cache: bool):
        self.comps = comps
        self.cache: dict[str, dict[str, torch.Tensor]] | None = None
        if cache:
            self.cache = {}
            with torch.no_grad():
                for prompt in sorted({e.prompt for e in data.subject + data.klass}):
                    encoded = comps.family.encode_prompt(comps, [prompt])
                    self.cache[prompt] = {k: v[0] for k, v in encoded.items()}

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        prompts = [e.prompt for e in batch.examples]
        if self.cache is not None:
            return {k: torch.stack([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}
        return self.comps.family.encode_prompt(self.comps, prompts)
