"""What the loop feeds the denoiser for a batch: clean latents and text tensors, cached when they cannot change.

Each image is encoded once (its VAE posterior) when nothing about it changes during training (no
random crops or flips), and each distinct prompt once when no text encoder trains. Otherwise they
are encoded per batch. Either way the family does the encoding, so the cache works for any family:
whatever `encode_images` and `encode_prompt` return is what is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.dataset import Batch, DreamBoothData
from .files import atomic_write_bytes
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
    """Text tensors for a batch (whatever the family's encode_prompt returns, first dimension N).

    With `cache`, every distinct prompt is encoded once, the validation prompts and the negative
    prompt included, and kept in memory; with `store` too, also on disk, with its provenance (the
    model family, the base model's fingerprint, the prompts), so a resumed or repeated run loads
    them instead of running the text encoder again (T5-XXL is 4.8 B weights).
    """

    def __init__(self, comps: Components, data: DreamBoothData, cache: bool, extra_prompts: list[str] = (),
                 store: Path | None = None, fingerprint: str = "", device=None):
        self.comps = comps
        self.cache: dict[str, dict[str, torch.Tensor]] | None = None
        if cache:
            prompts = sorted({e.prompt for e in data.subject + data.klass} | set(data.preserve_prompts) | set(extra_prompts))
            provenance = {"family": comps.family.name, "model_fingerprint": fingerprint}
            self.cache = _load(store, provenance, prompts, device) if store is not None else None
            if self.cache is None:
                with torch.no_grad():
                    self.cache = {p: {k: v[0] for k, v in comps.family.encode_prompt(comps, [p]).items()} for p in prompts}
                if store is not None:
                    _save(store, provenance, self.cache)

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.encode([e.prompt for e in batch.examples])

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            return {k: torch.stack([self.cache[p][k] for p in prompts]) for k in self.cache[prompts[0]]}
        return self.comps.family.encode_prompt(self.comps, prompts)


def _save(path: Path, provenance: dict, cache: dict[str, dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save

    prompts = list(cache)
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, p in enumerate(prompts) for k, v in cache[p].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata={"provenance": json.dumps({**provenance, "prompts": prompts})}))


def _load(path: Path, provenance: dict, prompts: list[str], device) -> dict[str, dict[str, torch.Tensor]] | None:
    """The stored embeddings if they come from this model and cover `prompts`; None to encode afresh."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("provenance", "{}"))
        if {k: stored.get(k) for k in provenance} != provenance or not set(prompts) <= set(stored.get("prompts", [])):
            return None
        index = {p: i for i, p in enumerate(stored["prompts"])}
        names = {key.split(".", 1)[1] for key in f.keys()}
        return {p: {k: f.get_tensor(f"{index[p]}.{k}").to(device) for k in names} for p in prompts}
