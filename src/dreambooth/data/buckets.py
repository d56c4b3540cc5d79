"""Aspect-ratio buckets: train each photo at the shape nearest its own, not at a square centre crop.

A square crop of a wide or tall photo cuts away whatever is off-centre, often the subject itself.
Bucketing (NovelAI's aspect-ratio bucketing, https://github.com/NovelAI/novelai-aspect-ratio-bucketing,
as kohya's sd-scripts and SDXL's own training use it) instead offers a table of (height, width)
shapes of about the same area, resolution², each side a multiple of a size step. A photo goes to
the bucket whose aspect ratio is nearest its own, is scaled just enough to cover it and loses only
the thin strip that the remaining aspect difference leaves (`images.crop_box`). The original size
and crop offset are recorded per image, which is what SDXL's size/crop time ids need.

The step is the family's resolution step x 8 (`ModelFamily.resolution_step`: the latent factor x
the denoiser's patch size; 64 px for SD's VAE and UNet, 8 px for IF, which works in pixels), so
each bucket maps to whole latents (whole patches of them) that a UNet can halve three times.

Every micro-batch comes from one bucket (tensors in a batch share a shape); `dataset.BucketOrder`
chooses them, as a pure function of (seed, position) like the unbucketed order.
"""

from __future__ import annotations

import math
from collections import Counter

from ..errors import DreamBoothError

Size = tuple[int, int]  # (height, width) in pixels


def bucket_step(resolution_step: int) -> int:
    """Bucket sides are multiples of this: the model's resolution step x 8 (64 px for SD/SDXL, 8 px for IF)."""
    return resolution_step * 8


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """The bucket table: (height, width) shapes of area at most resolution², sides in [min_side, max_side].

    For each width w (a multiple of `step`), the height is the largest multiple of `step` that
    keeps w * h <= resolution² (NovelAI's rule), and the transposed shape is added too. Sorted from
    tallest to widest (by width / height), so the table reads like the golden tables in the tests.

    Raises:
        DreamBoothError: If the sides are not multiples of `step` or do not enclose `resolution`.
    """
    for key, value in (("data.bucket_min_side", min_side), ("data.bucket_max_side", max_side)):
        if value % step or value <= 0:
            raise DreamBoothError(f"{key} must be a positive multiple of {step} (the bucket step), "
                                  f"got {value}; try {max(step, value // step * step)}")
    if not min_side <= resolution <= max_side:
        raise DreamBoothError(f"data.bucket_min_side ({min_side}) <= data.resolution ({resolution}) <= "
                              f"data.bucket_max_side ({max_side}) must hold; widen the sides or change the resolution")
    area = resolution * resolution
    sizes: set[Size] = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes.update({(h, w), (w, h)})
    return sorted(sizes, key=lambda s: (s[1] / s[0], -s[0]))


def bucket_table(data, resolution_step: int) -> list[Size]:
    """The bucket table for a `DataConfig`: its resolution, sides and step (defaults from the model filled in).
    `resolution_step`: the model's (`ModelFamily.resolution_step`), which every side must be a multiple of."""
    step = data.bucket_step if data.bucket_step is not None else bucket_step(resolution_step)
    if step <= 0 or step % resolution_step:
        raise DreamBoothError(f"data.bucket_step must be a positive multiple of {resolution_step} (the model's resolution "
                              f"step: latent factor x patch size), got {step}; try {bucket_step(resolution_step)}")
    min_side = data.bucket_min_side if data.bucket_min_side is not None else -(-data.resolution // 2 // step) * step
    max_side = data.bucket_max_side if data.bucket_max_side is not None else data.resolution * 2
    if data.resolution % step:
        raise DreamBoothError(f"data.buckets=true needs data.resolution to be a multiple of {step} (the bucket step), "
                              f"got {data.resolution}; try {max(step, data.resolution // step * step)}, "
                              "or set data.buckets=false")
    return bucket_sizes(data.resolution, step, min_side, max(max_side, data.resolution))


def uses_buckets(data, family) -> bool:
    """data.buckets, or the family's default where it is unset (families that declare none train unbucketed)."""
    return data.buckets if data.buckets is not None else bool(getattr(family, "buckets_by_default", False))


def buckets_for(data, family, resolution_step: int) -> list[Size] | None:
    """The bucket table this model trains with, or None without buckets (then no bucket_* setting may be given).
    `resolution_step`: `family.resolution_step(model_dir)`."""
    if uses_buckets(data, family):
        return bucket_table(data, resolution_step)
    given = [k for k in ("bucket_min_side", "bucket_max_side", "bucket_step") if getattr(data, k) is not None]
    if given:
        raise DreamBoothError(f"data.{given[0]} is set but buckets are off for this model: set data.buckets=true "
                              f"to use it, or remove it")
    return None


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the photo's, compared as log(width / height).

    In log space a 2:1 and a 1:2 photo are equally far from square. Ties go to the larger area,
    then to the first in `sizes`, so the choice never depends on anything but the table.
    """
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[1] / s[0]) - aspect), -s[0] * s[1]))


def class_image_counts(subject_sizes: list[Size], total: int) -> dict[Size, int]:
    """How many class images to generate per bucket: `total` split in proportion to the subject photos.

    Largest remainders settle the rounding (ties: the bucket listed first), and every bucket
    that holds a subject photo gets at least one class image, so the total may exceed `total`
    when there are more buckets than class images.
    """
    counts = Counter(subject_sizes)
    n = len(subject_sizes)
    shares = {size: total * c / n for size, c in counts.items()}
    result = {size: max(1, int(share)) for size, share in shares.items()}
    left = total - sum(result.values())
    for size in sorted(shares, key=lambda s: -(shares[s] - int(shares[s])))[:max(left, 0)]:
        result[size] += 1
    return dict(sorted(result.items()))


def check_class_buckets(subject_sizes: list[Size], class_sizes: list[Size], class_dirs: str) -> None:
    """With prior preservation every bucket that holds subject photos needs class images of its own."""
    missing = sorted(set(subject_sizes) - set(class_sizes))
    if class_sizes and missing:
        shapes = ", ".join(f"{h}x{w}" for h, w in missing)
        raise DreamBoothError(f"no class image in {class_dirs} falls in the bucket(s) {shapes} (height x width) that "
                              "subject photos use; add class images of those shapes, let them be generated "
                              "(class_images_user_supplied=false), or set data.buckets=false")
