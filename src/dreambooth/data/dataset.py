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

With aspect-ratio buckets (`buckets.py`) each photo trains at its bucket's (height, width) and every
micro-batch comes from one bucket: `BucketOrder` gives each bucket a `DataOrder` of its own and
deals micro-batches out to the buckets; crops and flips are drawn as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..config import ConceptConfig, DataConfig
from ..errors import DreamBoothError
from .buckets import Size, check_class_buckets, nearest_bucket
from .class_images import image_prompts
from .images import TrainingImage, crop_box, list_images, load_images, read_caption, to_tensor


@dataclass
class Example:
    path: Path
    prompt: str
    image: Image.Image  # decoded RGB, before resize/crop
    concept: int = 0  # index of its concept in the concept list


def subject_examples(concepts: list[ConceptConfig], data: DataConfig, without_identifier: bool = False) -> list[Example]:
    """All subject photos of all concepts, each with its caption file's text or the concept's prompt.

    without_identifier: drop each concept's identifier word from its prompts (a model family that
    trains without it, `ModelFamily.trains_with_identifier`)."""
    examples = []
    for i, concept in enumerate(concepts):
        paths = list_images(concept.instance_dir, "instance")
        for path, image in zip(paths, load_images(paths, data.min_image_size)):
            prompt = caption_of(path, data) or concept.instance_prompt
            if without_identifier:
                prompt = " ".join(w for w in prompt.split() if w != concept.resolved_identifier)
            examples.append(Example(path, prompt, image, i))
    return examples


def class_prompt_twins(subject: list[Example], concepts: list[ConceptConfig]) -> list[Example]:
    """prior.source=model's class examples: each subject photo again, with its concept's class prompt.

    Class example i is subject example i's twin, so the pairing below (subject i mod N, class i mod N)
    puts every photo beside its own twin, at the same size (bucket). The loop replaces the twin's clean
    latent with the base model's own sample for the class prompt (objective.base_samples): the photo
    gives the sample's size and the class prompt, not its content."""
    return [Example(e.path, concepts[e.concept].class_prompt, e.image, e.concept) for e in subject]


def caption_of(path: Path, data: DataConfig) -> str | None:
    """The caption file beside a photo (data.caption_extension), or None if it has none."""
    return read_caption(path, data.caption_extension)


def class_examples(files_per_concept: list[list[Path]], concepts: list[ConceptConfig], data: DataConfig) -> list[Example]:
    """Class images (already generated or user-supplied), each with the prompt it was made with (its concept's class
    prompt, or one of its caption-diverse class_prompts) or, for the user's own, its caption file's."""
    examples = []
    for i, (files, concept) in enumerate(zip(files_per_concept, concepts)):
        prompts = image_prompts(files, concept.class_prompt)
        examples += [Example(p, prompt, image, i)
                     for p, prompt, image in zip(files, prompts, load_images(files, data.min_image_size))]
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

    def preserve_prompt(self, position: int, k: int) -> int:
        """Which of k knowledge-preservation prompts the sample at `position` gets (uniform, a function of position)."""
        g = torch.Generator().manual_seed(self.seed * 6_151 + 15_485_863 * position + 2)
        return int(torch.randint(k, (), generator=g))


class BucketOrder:
    """Which bucket and which (subject, class) pairs a micro-batch gets, with aspect-ratio buckets.

    Each bucket b has its own stream, a `DataOrder` over its own subject and class examples (so
    pairing and epochs within a bucket are the unbucketed ones). Micro-batches are dealt out in
    rounds of K = sum over b of k_b, k_b = ceil(max(N_s(b), N_c(b)) / batch): round r holds k_b
    micro-batches of bucket b, in an order drawn from a generator seeded by (seed, r). Micro-batch
    m is number m % K of round m // K; being bucket b's j-th in its round, it takes positions
    (r * k_b + j) * batch ... + batch - 1 of b's stream. All of it is a function of (seed, m).

    With a single bucket this is exactly `DataOrder` (its stream, seed and positions are the
    unbucketed ones), so square photos train identically with buckets on or off.
    """

    def __init__(self, subject_sizes: list[Size], class_sizes: list[Size], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.sizes = sorted(set(subject_sizes))
        self.subject = {b: [i for i, s in enumerate(subject_sizes) if s == b] for b in self.sizes}
        self.klass = {b: [i for i, s in enumerate(class_sizes) if s == b] for b in self.sizes}
        self.orders = {b: DataOrder(len(self.subject[b]), len(self.klass[b]), seed + 7_919 * k)
                       for k, b in enumerate(self.sizes)}
        self.per_round = {b: math.ceil(self.orders[b].epoch_len / batch_size) for b in self.sizes}
        self.round_len = sum(self.per_round.values())
        self._rounds: dict[int, list[Size]] = {}

    def _round(self, r: int) -> list[Size]:
        if r not in self._rounds:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + r + 500_009)  # apart from the buckets' own streams
            dealt = [b for b in self.sizes for _ in range(self.per_round[b])]
            self._rounds = {r: [dealt[i] for i in torch.randperm(len(dealt), generator=g).tolist()]}  # keep one round
        return self._rounds[r]

    def batch(self, micro_index: int) -> tuple[Size, list[tuple[int, int | None]]]:
        """Micro-batch `micro_index` of the stream: its bucket and its (subject, class) index pairs."""
        r, n = divmod(micro_index, self.round_len)
        schedule = self._round(r)
        bucket = schedule[n]
        first = (r * self.per_round[bucket] + schedule[:n].count(bucket)) * self.batch_size
        subject, klass = self.subject[bucket], self.klass[bucket]
        pairs = [self.orders[bucket].pair(q) for q in range(first, first + self.batch_size)]
        return bucket, [(subject[s], klass[c] if c is not None else None) for s, c in pairs]


@dataclass
class Batch:
    examples: list[Example]  # subject examples first, then class examples, then knowledge-preservation ones
    is_prior: torch.Tensor  # (N,) bool: class examples (prior preservation)
    pixels: torch.Tensor | None  # (N, 3, H, W) in [-1, 1]; None when latents are cached
    indices: list[tuple[str, int]]  # ("subject" | "class", index) per example: the cache keys
    original_sizes: list[tuple[int, int]]  # (height, width) of each photo before resizing
    crops: list[tuple[int, int]]  # (top, left) of each crop in its resized photo
    target_size: tuple[int, int]  # (height, width) of every crop in the batch
    is_preserve: torch.Tensor | None = None  # (N,) bool: knowledge-preservation examples; None: there are none


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
    """Builds the micro-batch for any stream position range.

    buckets: the bucket table (`buckets.bucket_table`), or None to train every example at
    data.resolution square. Subject photos go to the bucket nearest their aspect ratio, class
    images to the nearest of the buckets the subject photos use (generated ones were made there).

    preserve_prompts: knowledge preservation. Every subject example of a batch is followed, after
    the class examples, by its photo again with one of these prompts (drawn per position); as for
    prior.source=model's twins, the loop replaces its latent with the base's own sample for that
    prompt, and the loss's target is the base's prediction.
    """

    def __init__(self, subject: list[Example], klass: list[Example], data: DataConfig, seed: int,
                 positions: Positions = Positions(), buckets: list[Size] | None = None,
                 preserve_prompts: list[str] = ()):
        if not subject:
            raise DreamBoothError("no subject images: check concept.instance_dir")
        self.subject, self.klass, self.data, self.positions = subject, klass, data, positions
        self.preserve_prompts = list(preserve_prompts)
        self.order = DataOrder(len(subject), len(klass), seed)  # unbucketed pairing, and every crop/flip draw
        self.size = (data.resolution, data.resolution)  # (height, width) of every crop without buckets
        self.bucket_order: BucketOrder | None = None
        self.sizes: dict[str, list[Size]] = {"subject": [self.size] * len(subject), "class": [self.size] * len(klass)}
        if buckets is not None:
            subject_sizes = [nearest_bucket(e.image.width, e.image.height, buckets) for e in subject]
            used = sorted(set(subject_sizes))
            class_sizes = [nearest_bucket(e.image.width, e.image.height, used) for e in klass]
            check_class_buckets(subject_sizes, class_sizes, ", ".join(sorted({str(e.path.parent) for e in klass if e.path})))
            self.sizes = {"subject": subject_sizes, "class": class_sizes}
            self.bucket_order = BucketOrder(subject_sizes, class_sizes, positions.batch_size, seed)

    def image(self, kind: str, index: int, position: int | None = None) -> TrainingImage:
        """One example's training crop at its bucket's size; `position` seeds crop/flip when augmenting."""
        example = (self.subject if kind == "subject" else self.klass)[index]
        g = self.order.augmentation_generator(position) if position is not None else None
        flip = bool(self.data.random_flip and torch.rand((), generator=g) < 0.5) if g is not None else False
        return to_tensor(example.image, self.sizes[kind][index], center_crop=self.data.center_crop, flip=flip, generator=g)

    def pixels(self, kind: str, index: int, position: int | None = None) -> torch.Tensor:
        """One example's training tensor (3, H, W)."""
        return self.image(kind, index, position).pixels

    def micro_batch(self, step: int, micro: int, with_pixels: bool) -> Batch:
        """This process's micro-batch `micro` of optimizer step `step` (see `Positions`)."""
        return self.batch(self.positions.first(step, micro), self.positions.batch_size, with_pixels)

    def batch(self, first_position: int, batch_size: int, with_pixels: bool) -> Batch:
        if self.bucket_order is None:
            size, pairs = self.size, [self.order.pair(p) for p in range(first_position, first_position + batch_size)]
        else:  # one bucket per micro-batch: positions come in whole micro-batches (`Positions.first`)
            if first_position % batch_size or batch_size != self.bucket_order.batch_size:
                raise ValueError(f"bucketed batches start at multiples of {self.bucket_order.batch_size}, "
                                 f"got positions {first_position}..+{batch_size}")
            size, pairs = self.bucket_order.batch(first_position // batch_size)
        subject_idx, class_idx = [], []
        for p, (s, c) in enumerate(pairs, start=first_position):
            subject_idx.append((s, p))
            if c is not None:
                class_idx.append((c, p))
        keys = [("subject", s) for s, _ in subject_idx] + [("class", c) for c, _ in class_idx]
        examples = [self.subject[s] for s, _ in subject_idx] + [self.klass[c] for c, _ in class_idx]
        positions = [p for _, p in subject_idx] + [p for _, p in class_idx]
        preserve_idx = subject_idx if self.preserve_prompts else []
        for s, p in preserve_idx:  # the photo again (its size; its cached latent is the subject's), a general prompt
            prompt = self.preserve_prompts[self.order.preserve_prompt(p, len(self.preserve_prompts))]
            e = self.subject[s]
            keys.append(("subject", s))
            examples.append(Example(e.path, prompt, e.image, e.concept))
            positions.append(p)
        is_prior = torch.tensor([False] * len(subject_idx) + [True] * len(class_idx) + [False] * len(preserve_idx))
        is_preserve = (torch.tensor([False] * (len(subject_idx) + len(class_idx)) + [True] * len(preserve_idx))
                       if self.preserve_prompts else None)
        pixels = None
        if with_pixels:
            crops = [self.image(kind, i, p) for (kind, i), p in zip(keys, positions)]
            pixels = torch.stack([c.pixels for c in crops])
            sizes, offsets = [c.original_size for c in crops], [c.crop_top_left for c in crops]
        else:  # latents are cached only without augmentation: every crop is the deterministic centre crop
            sizes = [(e.image.height, e.image.width) for e in examples]
            offsets = [crop_box(e.image.width, e.image.height, size)[1:] for e in examples]
        return Batch(examples, is_prior, pixels, keys, sizes, offsets, size, is_preserve)
