"""From a user's folder of photos to validated RGB images and training tensors.

Photos come from phones, cameras, scanners and image editors, so this module expects the odd
ones: EXIF-rotated JPEGs, transparent and palette PNGs, CMYK JPEGs, 16-bit scans, truncated
downloads and files with the wrong extension. Every one either becomes an 8-bit RGB image or
raises a `DreamBoothError` that names the file and says what to do, before training starts.

Listings are sorted by file name so that the same folder always gives the same order (compare
`iterdir()` in diffusers' `DreamBoothDataset`, which is unsorted and keeps non-images).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DreamBoothError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
)
"""Accepted file extensions, compared lower-case (so `IMG_0001.JPG` counts)."""

_ACCEPTED = ", ".join(sorted(IMAGE_EXTENSIONS))
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE_MODES = {"P", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"}
_TIFF_BITS_PER_SAMPLE = 258


# Folder listing


def _is_image_file(path: Path) -> bool:
    return (
        not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
    )


def _entries(folder: Path, what: str) -> list[Path]:
    try:
        return list(folder.iterdir())
    except PermissionError:
        raise DreamBoothError(
            f"The {what} image folder {folder} cannot be read (permission denied); "
            f"fix its permissions or copy the images to a folder you own."
        ) from None


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in an existing `folder`, sorted by name; [] when there are none.

    The one listing every image folder goes through (instance photos, class images, the doctor,
    the UI): files whose extension is not in `IMAGE_EXTENSIONS` and hidden files (names starting
    with ".", e.g. macOS `._photo.jpg` resource forks) are skipped. Sub-folders are not searched.
    `list_images` adds the checks and messages for a folder the user named.
    """
    return _images_among(Path(folder).iterdir())


def _images_among(entries) -> list[Path]:
    return sorted((p for p in entries if _is_image_file(p)), key=lambda p: p.name)


def list_images(folder: str | Path, what: str = "instance") -> list[Path]:
    """`image_files` of a folder the user named, refusing a missing, unreadable or image-less one.

    Args:
        folder (str | Path): The folder that holds the images.
        what (str): What the images are ("instance", "class"); used in error messages.

    Returns:
        list[Path]: The image files, sorted by name so the order never depends on the disk.

    Raises:
        DreamBoothError: If `folder` does not exist, is a file, or holds no image.
    """
    folder = Path(folder).absolute()
    if not folder.exists():
        raise DreamBoothError(
            f"The {what} image folder {folder} does not exist; check the path "
            f"(it is relative to the directory you run the command from)."
        )
    if not folder.is_dir():
        raise DreamBoothError(
            f"The {what} image path {folder} is a file, not a folder; "
            f"pass the folder that contains the {what} images."
        )
    entries = _entries(folder, what)
    images = _images_among(entries)
    if not images:
        raise DreamBoothError(_no_images_message(folder, entries, what))
    return images


def _has_images(folder: Path) -> bool:
    try:
        return any(_is_image_file(p) for p in folder.iterdir())
    except OSError:  # an unreadable sub-folder only affects the hint, not the error itself
        return False


def _no_images_message(folder: Path, entries: list[Path], what: str) -> str:
    visible = [p for p in entries if not p.name.startswith(".")]
    others = sorted(p for p in visible if p.is_file())
    sub_with_images = [d for d in sorted(p for p in visible if p.is_dir()) if _has_images(d)]
    message = f"No {what} images in {folder}: found {len(others)} other file(s)"
    if others:
        # The extensions found are the useful hint: '.heic' from an iPhone, '.gif', '.zip'.
        found = sorted({p.suffix.lower() or "(no extension)" for p in others})
        message += f" ({', '.join(found[:8])}{', ...' if len(found) > 8 else ''})"
    message += f"; accepted extensions are {_ACCEPTED}."
    if sub_with_images:
        message += (
            f" Images must be directly in {folder}, not in sub-folders like {sub_with_images[0]};"
            f" move them up or point to that sub-folder."
        )
    else:
        message += f" Add some {what} images or convert them to PNG or JPEG."
    return message


# Loading one image


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    return " ".join(str(exc).split()) or type(exc).__name__


def load_image(path: str | Path, min_size: int = 0) -> Image.Image:
    """Open and fully decode an image, upright and as 8-bit RGB.

    The file is decoded in full here (`img.load()`), so a truncated download fails now rather
    than halfway through training. The EXIF orientation is applied, because phones store
    portrait photos as landscape pixels plus an "Orientation" tag. See `_to_rgb` for how each
    pixel mode becomes RGB.

    Args:
        path (str | Path): The image file.
        min_size (int): The smallest allowed size of the shorter side, in pixels; 0 allows any.

    Returns:
        PIL.Image.Image: An RGB image, independent of the file (which is closed).

    Raises:
        DreamBoothError: If the file cannot be read or decoded, or is smaller than `min_size`.
    """
    path = Path(path).absolute()
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright, path)
    except DreamBoothError:
        raise
    except FileNotFoundError:
        raise DreamBoothError(
            f"Image {path} does not exist; was it moved or deleted after the folder was listed?"
        ) from None
    except IsADirectoryError:
        raise DreamBoothError(f"{path} is a folder, not an image; remove or rename it.") from None
    except PermissionError:
        raise DreamBoothError(
            f"Image {path} cannot be read (permission denied); fix its permissions or remove it."
        ) from None
    except Image.DecompressionBombError as exc:
        raise DreamBoothError(
            f"Image {path} is too large to open safely ({_one_line(exc)}); "
            f"downscale it (e.g. to 4096 pixels on the longer side) or remove it."
        ) from None
    # Pillow's format plugins raise many types on bad data (OSError, ValueError, SyntaxError,
    # struct.error, ...), and all of them mean the same thing to the user.
    except Exception as exc:
        raise DreamBoothError(
            f"Cannot read image {path} ({_one_line(exc)}); "
            f"re-export it as PNG or JPEG, or remove it."
        ) from None
    width, height = rgb.size
    if min(width, height) < min_size:
        raise DreamBoothError(
            f"Image {path} is {width}x{height} pixels, smaller than the minimum of {min_size} "
            f"on its shorter side; upscale it to at least {min_size} pixels, replace it, "
            f"or lower `data.min_size`."
        )
    return rgb


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited onto white: most transparent PNGs are cut-outs meant to sit
    on a page, and a plain `convert("RGB")` would reveal whatever colour the hidden pixels hold
    (often black). Integer and float grayscale is scaled by its bit depth, because
    `convert("L")` clips a 16-bit scan to mostly pure white.
    """
    mode = img.mode
    if mode in _ALPHA_MODES or (mode in {"P", "L", "RGB"} and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    if mode in _CONVERTIBLE_MODES:
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _gray_to_rgb(img)
    raise DreamBoothError(
        f"Image {path} has pixel mode {mode!r}, which cannot be converted to RGB; "
        f"re-export it as PNG or JPEG, or remove it."
    )


def _gray_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer ("I;16", "I;16B", "I") or float ("F") grayscale to 8-bit RGB."""
    values = np.asarray(img).astype(np.float64)  # (H, W)
    if img.mode == "F":
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0  # the usual convention for float images
        # Otherwise stretch the data's own range: floats have no bit depth to scale by.
    elif img.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = _int32_range(img, values)
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    # The clip only guards rounding at the ends; the scale already maps the range onto 0..255.
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _int32_range(img: Image.Image, values: np.ndarray) -> tuple[float, float]:
    """The value range of an "I" (32-bit signed) image, from its real bit depth.

    Mode "I" holds 16-bit PNGs (older Pillow), 16- and 32-bit TIFFs alike. A TIFF says its depth
    in BitsPerSample; otherwise a maximum that fits in 16 bits means 16-bit data.
    """
    bits = None
    tags = getattr(img, "tag_v2", None)
    if tags is not None and _TIFF_BITS_PER_SAMPLE in tags:
        bps = tags[_TIFF_BITS_PER_SAMPLE]
        bits = int(bps[0] if isinstance(bps, tuple) else bps)
    low = float(values.min())
    if low < 0:
        return -(2.0**31), 2.0**31 - 1  # signed data: map the full int32 range
    if bits is None:
        bits = 16 if values.max() <= 65535 else 32
    return 0.0, float(min(2**bits - 1, 2**31 - 1))


# Captions


def read_caption(image_path: str | Path, extension: str = ".txt") -> str | None:
    """Read the caption stored beside an image (`name.txt` for `name.png`).

    Args:
        image_path (str | Path): The image whose caption to read.
        extension (str): The caption file's extension (`data.caption_extension`).

    Returns:
        str | None: The caption, whitespace-stripped, or None if there is no caption file.

    Raises:
        DreamBoothError: If the caption file is empty, not UTF-8, or cannot be read.
    """
    caption_path = Path(image_path).absolute().with_suffix(extension)
    if not caption_path.exists():
        return None
    try:
        raw = caption_path.read_bytes()
    except OSError as exc:
        raise DreamBoothError(
            f"Caption file {caption_path} cannot be read ({_one_line(exc)}); fix or remove it."
        ) from None
    try:
        # "utf-8-sig" drops the byte-order mark that Windows Notepad writes.
        caption = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise DreamBoothError(
            f"Caption file {caption_path} is not UTF-8 text; save it again as UTF-8."
        ) from None
    if not caption:
        raise DreamBoothError(
            f"Caption file {caption_path} is empty; write the caption in it, or delete it "
            f"to use the concept's prompt for {Path(image_path).name}."
        )
    return caption


# Validation


def load_images(paths: list[Path], min_size: int) -> list[Image.Image]:
    """Decode every image once and report all the bad ones together.

    Training only starts when every image loads, and one error lists every bad file so the
    user can fix them all in one go instead of one per run. The decoded images are returned, so
    checking a photo and using it cost one decode, not two.

    Args:
        paths (list[Path]): The images to load, e.g. from `list_images`.
        min_size (int): The smallest allowed shorter side, in pixels (see `load_image`).

    Returns:
        list[PIL.Image.Image]: Upright 8-bit RGB images, in the order of `paths`.

    Raises:
        DreamBoothError: One error with one line per bad file.
    """
    images, problems = [], []
    for path in paths:
        try:
            images.append(load_image(path, min_size=min_size))
        except DreamBoothError as exc:
            problems.append(str(exc))
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DreamBoothError(
            f"{len(problems)} of {len(paths)} images cannot be used; "
            f"fix or remove them and run again:\n{listing}"
        )
    return images


# Training tensors


class TrainingImage(NamedTuple):
    """A training crop and where it came from (SDXL conditions on both; buckets will record them)."""

    pixels: torch.Tensor  # float32 (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the photo before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized photo, as the model sees it


def crop_box(width: int, height: int, size: tuple[int, int], center_crop: bool = True,
             generator: torch.Generator | None = None) -> tuple[tuple[int, int], int, int]:
    """Where a (height, width) `size` crop comes from: the resized photo's (width, height), top, left.

    The photo is scaled (keeping its aspect) just enough to cover `size`, then cropped at the
    centre or at an offset drawn with `torch.randint(..., generator=generator)`, top first. Both
    offsets are always drawn, so the generator advances the same amount for every image.
    """
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    # max() keeps each side at least the target whatever the rounding does.
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale))) if scale != 1 else (width, height)
    if center_crop:
        return resized, (resized[1] - target_h) // 2, (resized[0] - target_w) // 2
    top = int(torch.randint(0, resized[1] - target_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, resized[0] - target_w + 1, (1,), generator=generator))
    return resized, top, left


def to_tensor(
    image: Image.Image,
    size: int | tuple[int, int],
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> TrainingImage:
    """Resize, crop and normalise an RGB image into a training tensor, with its size and crop.

    The image is resized (PIL bicubic, which antialiases when shrinking) so that it just covers
    `size`, then cropped to it (see `crop_box`). A flip mirrors the crop and its offset: the
    recorded left edge is then measured in the mirrored photo, which is what the model saw.

    Args:
        image (PIL.Image.Image): An RGB image, e.g. from `load_image`.
        size (int | tuple[int, int]): The output (height, width) in pixels; an int is a square.
        center_crop (bool): Crop the centre; if False, crop at a random offset.
        flip (bool): Mirror left-right. The caller decides, with its own random numbers.
        generator (torch.Generator | None): The generator for the random crop.

    Returns:
        TrainingImage: pixels float32 (3, height, width) in [-1, 1], the photo's original
        (height, width), and the crop's (top, left).

    Raises:
        ValueError: If `image` is not RGB or `size` is not positive (programming errors).
    """
    if image.mode != "RGB":
        raise ValueError(
            f"to_tensor needs an RGB image, got mode {image.mode!r}; use load_image first."
        )
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}.")
    original = (image.height, image.width)
    resized, top, left = crop_box(image.width, image.height, (height, width), center_crop, generator)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + width, top + height))

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3) uint8
    tensor = pixels.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0  # (3, H, W) in [-1, 1]
    if flip:
        tensor = tensor.flip(-1)
        left = resized[0] - width - left
    return TrainingImage(tensor.contiguous(), original, (top, left))
