"""Subject and class examples, and a data order that is a pure function of the step.

DreamBooth data is tiny (5-20 subject photos, 100-200 class images), so every image is decoded
once into memory and validated before training starts. The order in which examples are seen is
computed from (seed, position) alone: position p of the stream lives in epoch p // N and is
index perm_epoch[p % N], with perm_epoch drawn from a generator seeded by (seed, epoch); crops
and flips are drawn from a generator seeded by (seed, p). A resumed run therefore needs nothing
but the step number to continue exactly where it stopped, and processes of a multi-GPU run each
take their own positions.

Pairing follows the paper and diffusers: index i of an epoch pairs subject example i mod N_s with
class example i mod N_c, and an epoch has max(N_s, N_c) indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..config import ConceptConfig, DataConfig
from ..errors import DreamBoothError
from .images import TrainingImage, crop_box, list_images, load_images, read_caption, to_tensor


@dataclass
class Example:
    path: Path
    prompt: str
    image: Image.Image  # decoded RGB, before resize/crop


def subject_examples(concepts: list[ConceptConfig], data: DataConfig, without_identifier: bool = False) -> list[Example]:
    """All subject photos of all concepts, each with its caption file's text or the concept's prompt.

    without_identifier: drop each concept's identifier word from its prompts (a model family that
    trains without it, `ModelFamily.trains_with_identifier`)."""
    examples = []
    for concept in concepts:
        paths = list_images(concept.instance_dir, "instance")
        for path, image in zip(paths, load_images(paths, data.min_image_size)):
            caption = read_caption(path) if data.caption_extension == ".txt" else _read_other_caption(path, data)
            prompt = caption or concept.instance_prompt
            if without_identifier:
                prompt = " ".join(w for w in prompt.split() if w != concept.resolved_identifier)
            examples.append(Example(path, prompt, image))
    return examples


def _read_other_caption(path: Path, data: DataConfig) -> str | None:
    caption_path = path.with_suffix(data.caption_extension)
    if not caption_path.is_file():
        return None
    text = caption_path.read_text(encoding="utf-8-sig").strip()
    if not text:
        raise DreamBoothError(f"caption file {caption_path} is empty: write the caption or delete the file")
    return text


def class_examples(files_per_concept: list[list[Path]], concepts: list[ConceptConfig], data: DataConfig) -> list[Example]:
    """Class images (already generated or user-supplied) with their concept's class prompt."""
    examples = []
    for files, concept in zip(files_per_concept, concepts):
        examples += [Example(p, concept.class_prompt, image) for p, image in zip(files, load_images(files, data.min_image_size))]
    return examples


class DataOrder:
    """Which (subject, class) pair and which augmentation draw a stream position gets."""

    def __init__(self, n_subject: int, n_class: int, seed: int):
        self.n_subject, self.n_class, self.seed = n_subject, n_class, seed
        self.epoch_len = max(n_subject, n_class)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.epoch_len, generator=g)}  # keep one epoch: positions advance
        return self._perms[epoch]

    def pair(self, position: int) -> tuple[int, int | None]:
        index = int(self._perm(position // self.epoch_len)[position % self.epoch_len])
        return index % self.n_subject, (index % self.n_class if self.n_class else None)

    def augmentation_generator(self, position: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7_919 + 104_729 * position + 1)


@dataclass
class Batch:
    examples: list[Example]  # subject examples first, then class examples
    is_prior: torch.Tensor  # (2B,) or (B,) bool
    pixels: torch.Tensor | None  # (N, 3, H, W) in [-1, 1]; None when latents are cached
    indices: list[tuple[str, int]]  # ("subject" | "class", index) per example: the cache keys
    original_sizes: list[tuple[int, int]]  # (height, width) of each photo before resizing
    crops: list[tuple[int, int]]  # (top, left) of each crop in its resized photo
    target_size: tuple[int, int]  # (height, width) of every crop in the batch


@dataclass(frozen=True)
class Positions:
    """Which stream positions a micro-batch takes: (step, micro, rank) -> disjoint ranges.

    Position p belongs to exactly one (step, micro-batch, process), so processes never see the
    same example in the same step and a resume needs only the step number.
    """

    batch_size: int = 1
    accumulation: int = 1
    world: int = 1
    rank: int = 0

    def first(self, step: int, micro: int) -> int:
        return ((step * self.accumulation + micro) * self.world + self.rank) * self.batch_size


class DreamBoothData:
    """Builds the micro-batch for any stream position range."""

    def __init__(self, subject: list[Example], klass: list[Example], data: DataConfig, seed: int,
                 positions: Positions = Positions()):
        if not subject:
            raise DreamBoothError("no subject images: check concept.instance_dir")
        self.subject, self.klass, self.data, self.positions = subject, klass, data, positions
        self.order = DataOrder(len(subject), len(klass), seed)
        self.size = (data.resolution, data.resolution)  # (height, width) of every training crop

    def image(self, kind: str, index: int, position: int | None = None) -> TrainingImage:
        """One example's training crop; `position` seeds crop/flip when augmenting."""
        example = (self.subject if kind == "subject" else self.klass)[index]
        g = self.order.augmentation_generator(position) if position is not None else None
        flip = bool(self.data.random_flip and torch.rand((), generator=g) < 0.5) if g is not None else False
        return to_tensor(example.image, self.size, center_crop=self.data.center_crop, flip=flip, generator=g)

    def pixels(self, kind: str, index: int, position: int | None = None) -> torch.Tensor:
        """One example's training tensor (3, H, W)."""
        return self.image(kind, index, position).pixels

    def micro_batch(self, step: int, micro: int, with_pixels: bool) -> Batch:
        """This process's micro-batch `micro` of optimizer step `step` (see `Positions`)."""
        return self.batch(self.positions.first(step, micro), self.positions.batch_size, with_pixels)

    def batch(self, first_position: int, batch_size: int, with_pixels: bool) -> Batch:
        subject_idx, class_idx = [], []
        for p in range(first_position, first_position + batch_size):
            s, c = self.order.pair(p)
            subject_idx.append((s, p))
            if c is not None:
                class_idx.append((c, p))
        keys = [("subject", s) for s, _ in subject_idx] + [("class", c) for c, _ in class_idx]
        examples = [self.subject[s] for s, _ in subject_idx] + [self.klass[c] for c, _ in class_idx]
        is_prior = torch.tensor([False] * len(subject_idx) + [True] * len(class_idx))
        pixels = None
        if with_pixels:
            positions = [p for _, p in subject_idx] + [p for _, p in class_idx]
            crops = [self.image(kind, i, p) for (kind, i), p in zip(keys, positions)]
            pixels = torch.stack([c.pixels for c in crops])
            sizes, offsets = [c.original_size for c in crops], [c.crop_top_left for c in crops]
        else:  # latents are cached only without augmentation: every crop is the deterministic centre crop
            sizes = [(e.image.height, e.image.width) for e in examples]
            offsets = [crop_box(e.image.width, e.image.height, self.size)[1:] for e in examples]
        return Batch(examples, is_prior, pixels, keys, sizes, offsets, self.size)
