"""`dreambooth doctor DIR`: what training will make of a folder of photos, before any training.

For each photo: its size and aspect ratio, the bucket it trains in (`data/buckets.py`), whether
an EXIF rotation was applied and its pixel mode converted, and its caption file (and whether the
caption names the subject's identifier). Across the folder: exact duplicates (same pixels) and
near duplicates (perceptual hashes from `imagehash`), blurry photos, photos too small for their
bucket, and the state of the class-image folder. A contact sheet shows the crops the trainer
will actually use, grouped by bucket, with problems outlined.

Errors are what would make training refuse the folder or waste it (unreadable files, photos
below data.min_size, bad caption files, exact duplicates); everything else is a warning. `train`
runs the same checks on the photos it has decoded and logs the warnings (`log_short_report`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .config import DataConfig
from .data.buckets import Size, nearest_bucket
from .data.images import crop_box, image_files, list_images, load_image, read_caption, to_tensor
from .errors import DreamBoothError

log = logging.getLogger("dreambooth")

BLUR_THRESHOLD = 100.0
"""Blurry below this variance of the Laplacian (the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]], as OpenCV's
`cv2.Laplacian` with ksize=1) of the 8-bit grayscale training crop. 100 is the customary cut-off for photos;
measured on the crop, so the value does not depend on the photo's own pixel count. Smooth, low-contrast scenes
(a plain studio backdrop) can score low without being blurred, hence a warning, not an error."""

NEAR_DUPLICATE_BITS = 6
"""Near duplicates: 64-bit perceptual hashes (`imagehash.phash`) at most this many bits apart."""

CROP_KEEPS = 0.7
"""Without buckets, warn when the square crop keeps less than this share of a photo (e.g. of a 3:2 or 16:9 one)."""

EXIF_ORIENTATION = 0x0112


@dataclass
class ImageReport:
    file: str
    width: int | None = None  # upright, after the EXIF rotation
    height: int | None = None
    aspect: float | None = None  # width / height
    bucket: Size | None = None  # (height, width) it trains at
    crop_top_left: Size | None = None  # (top, left) of the centre crop in the resized photo
    upscale: float | None = None  # > 1: the photo is enlarged to fill its bucket
    exif_rotated: bool | None = None  # None: not known (train's short report sees decoded images only)
    mode: str | None = None  # the file's pixel mode, before the conversion to RGB
    converted: bool | None = None
    caption_file: str | None = None
    caption: str | None = None
    caption_has_identifier: bool | None = None  # None: no caption or no identifier to look for
    blur: float | None = None  # variance of the Laplacian of the training crop
    phash: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Report:
    folder: str
    resolution: int
    buckets: bool
    blur_threshold: float
    near_duplicate_bits: int
    images: list[ImageReport]
    exact_duplicates: list[list[str]] = field(default_factory=list)  # groups of files with identical pixels
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)  # (file, file, bits apart)
    class_folder: dict | None = None

    @property
    def errors(self) -> list[str]:
        return [f"{r.file}: {m}" for r in self.images for m in r.errors]

    @property
    def warnings(self) -> list[str]:
        out = [f"{r.file}: {m}" for r in self.images for m in r.warnings]
        return out + (self.class_folder or {}).get("warnings", [])

    def to_json(self) -> dict:
        return {**asdict(self), "errors": self.errors, "warnings": self.warnings, "ok": not self.errors}


# ---- measurements ------------------------------------------------------------------------

def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the 8-bit grayscale image (Pech-Pacheco et al. 2000)."""
    g = np.asarray(image.convert("L"), dtype=np.float64)  # (H, W)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]  # valid region, no padding
    return float(lap.var())


def training_crop(image: Image.Image, size: Size) -> Image.Image:
    """The centre crop the trainer uses, as an image (`images.to_tensor`, mapped back to 8 bits)."""
    pixels = to_tensor(image, size).pixels  # (3, H, W) in [-1, 1]
    return Image.fromarray(((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def _file_facts(path: Path) -> tuple[str | None, bool | None]:
    """The pixel mode and whether an EXIF rotation applies, read from the header (no decode)."""
    try:
        with Image.open(path) as img:
            return img.mode, img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    except Exception:  # load_image reports why the file cannot be read
        return None, None


# ---- the checks --------------------------------------------------------------------------

def examine(entries: list[tuple[Path, Image.Image | None, str | None]], data: DataConfig, buckets: list[Size] | None,
            identifiers: dict[Path, str] | None = None, blur_threshold: float = BLUR_THRESHOLD,
            file_facts: bool = True, folder: str = "") -> tuple[Report, dict[str, Image.Image]]:
    """Check decoded photos: `entries` holds (path, RGB image or None, why it could not be loaded).

    identifiers: photo folder -> the identifier its captions should contain (none: not checked).
    Returns the report and each loaded photo's training crop (for the contact sheet).
    """
    import imagehash

    identifiers = identifiers or {}
    reports, crops, hashes, pixel_hashes = [], {}, {}, {}
    for path, image, load_error in entries:
        r = ImageReport(file=path.name)
        reports.append(r)
        if file_facts:
            r.mode, r.exif_rotated = _file_facts(path)
            r.converted = r.mode is not None and r.mode != "RGB"
        _check_caption(r, path, data, identifiers.get(path.parent))
        if image is None:
            r.errors.append(load_error or "cannot be read")
            continue
        r.width, r.height = image.size
        r.aspect = round(image.width / image.height, 4)
        r.bucket = nearest_bucket(image.width, image.height, buckets) if buckets else (data.resolution, data.resolution)
        _, top, left = crop_box(image.width, image.height, r.bucket)
        r.crop_top_left = (top, left)
        r.upscale = round(max(r.bucket[0] / image.height, r.bucket[1] / image.width), 3)
        if min(image.size) < data.min_image_size:
            r.errors.append(f"{image.width}x{image.height} pixels, below data.min_size={data.min_image_size} on the shorter "
                            "side: training refuses it; replace it with a larger photo or remove it")
        elif r.upscale > 1:
            h, w = r.bucket
            need = f"{math.ceil(image.width * r.upscale)}x{math.ceil(image.height * r.upscale)}"
            r.warnings.append(f"too small for its {h}x{w} bucket (height x width): enlarged x{r.upscale:.2f}, which "
                              f"blurs it; use a photo of at least {need} pixels (width x height)")
        kept = min(image.width / image.height, image.height / image.width) if buckets is None else 1.0
        if kept < CROP_KEEPS:  # without buckets a square crop of a wide or tall photo drops its ends
            r.warnings.append(f"the square centre crop keeps only {kept:.0%} of this {image.width}x{image.height} photo: "
                              "check on the contact sheet that the subject is in it, or train with data.buckets=true")
        crop = crops[r.file] = training_crop(image, r.bucket)
        r.blur = round(laplacian_variance(crop), 1)
        if r.blur < blur_threshold:
            r.warnings.append(f"blurry: variance of the Laplacian {r.blur:.1f} < {blur_threshold:g} (on its training crop); "
                              "replace it with a sharper photo or remove it")
        hashes[r.file] = imagehash.phash(image)
        r.phash = str(hashes[r.file])
        pixel_hashes.setdefault(hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest(), []).append(r)

    report = Report(folder, data.resolution, buckets is not None, blur_threshold, NEAR_DUPLICATE_BITS, reports)
    for group in pixel_hashes.values():
        if len(group) > 1:
            report.exact_duplicates.append([r.file for r in group])
            for r in group[1:]:  # the first copy is fine; each further copy is the problem
                r.errors.append(f"exact duplicate of {group[0].file} (same pixels): it would train twice as often; remove it")
    exact = {r.file: i for i, g in enumerate(pixel_hashes.values()) for r in g}
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            bits = int(hashes[a] - hashes[b])  # Hamming distance
            if bits <= NEAR_DUPLICATE_BITS and exact[a] != exact[b]:
                report.near_duplicates.append((a, b, bits))
                next(r for r in reports if r.file == b).warnings.append(
                    f"near duplicate of {a} (perceptual hashes {bits} of 64 bits apart): keep one unless they differ on purpose")
    return report, crops


def _check_caption(r: ImageReport, path: Path, data: DataConfig, identifier: str | None) -> None:
    caption_path = path.with_suffix(data.caption_extension)
    if not caption_path.is_file():
        return
    r.caption_file = caption_path.name
    try:
        r.caption = read_caption(path, data.caption_extension)  # as training reads it
    except DreamBoothError as e:
        r.errors.append(str(e))
        return
    if identifier:
        r.caption_has_identifier = identifier in r.caption.split()
        if not r.caption_has_identifier:
            r.warnings.append(f"caption {caption_path.name} does not contain the identifier {identifier!r}: this photo "
                              f"teaches its look without the name; add {identifier!r} to the caption")


def class_folder_status(class_dir: str | Path, model_path: str | Path | None = None) -> dict:
    """Where a class-image folder's images came from: generated (with a manifest) or the user's own.

    Generated folders are CLASS_DIR itself or, with buckets, its <height>x<width> sub-folders, each
    with a manifest.jsonl (`data/class_images.py`). With `model_path`, each image's recorded model
    fingerprint is compared with that model's.
    """
    from .data.class_images import MANIFEST, _read_manifest, model_fingerprint

    class_dir = Path(class_dir)
    status: dict = {"path": str(class_dir), "warnings": []}
    if not class_dir.is_dir():
        return {**status, "status": "absent", "detail": "class images will be generated here"}
    folders = [class_dir] + sorted(p for p in class_dir.iterdir() if (p / MANIFEST).is_file())
    fingerprint = model_fingerprint(model_path) if model_path else None
    status["folders"] = []
    for folder in folders:
        images = [p.name for p in image_files(folder)]
        if not (folder / MANIFEST).is_file():
            if images:
                status["folders"].append({"folder": folder.name, "status": "user-supplied", "images": len(images)})
            continue
        entries = _read_manifest(folder)
        listed = {e.get("file") for e in entries}
        info = {"folder": folder.name, "status": "generated", "images": len(images), "manifest_entries": len(entries),
                "missing_files": sorted(f for f in listed if f not in images),
                "unlisted_images": sorted(set(images) - listed),
                "prompts": sorted({str(e.get("prompt")) for e in entries}),
                "sizes": sorted({str(e.get("size") or e.get("resolution")) for e in entries})}
        if fingerprint is not None:
            info["other_model"] = sum(e.get("model") != fingerprint for e in entries)
        for key, what in (("missing_files", "listed in the manifest but missing (they will be regenerated)"),
                          ("unlisted_images", "not in the manifest (training refuses the folder unless "
                                              "class_images_user_supplied=true)")):
            if info[key]:
                status["warnings"].append(f"{folder}: {len(info[key])} image(s) {what}")
        if info.get("other_model"):
            status["warnings"].append(f"{folder}: {info['other_model']} image(s) made by another model (they will be regenerated)")
        if info["missing_files"] or info["unlisted_images"] or info.get("other_model"):
            info["status"] = "stale"
        status["folders"].append(info)
    kinds = {f["status"] for f in status["folders"]}
    status["status"] = "empty" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return status


def examine_folder(folder: str | Path, data: DataConfig, buckets: list[Size] | None, identifier: str | None = None,
                   class_dir: str | None = None, model_path: str | None = None,
                   blur_threshold: float = BLUR_THRESHOLD) -> tuple[Report, dict[str, Image.Image]]:
    """Load every photo in `folder` (as training does, keeping going past bad ones) and check them."""
    paths = list_images(folder)
    entries = []
    for path in paths:
        try:
            entries.append((path, load_image(path), None))
        except DreamBoothError as e:
            entries.append((path, None, str(e)))
    folder = Path(folder).absolute()
    report, crops = examine(entries, data, buckets, {folder: identifier} if identifier else None, blur_threshold,
                            folder=str(folder))
    if class_dir:
        report.class_folder = class_folder_status(class_dir, model_path)
    return report, crops


# ---- output ------------------------------------------------------------------------------

def format_report(report: Report) -> str:
    """A table of the photos, then the problems, one line each."""
    lines = [f"{report.folder}: {len(report.images)} photos at resolution {report.resolution}, "
             f"buckets {'on' if report.buckets else 'off'}, blur threshold {report.blur_threshold:g} "
             "(variance of the Laplacian of the training crop)",
             f"{'file':28s} {'size':>11s} {'aspect':>6s} {'bucket':>9s} {'scale':>7s} {'blur':>8s} "
             f"{'exif':>4s} {'mode':>5s} caption"]
    for r in report.images:
        size = f"{r.width}x{r.height}" if r.width else "-"
        bucket = f"{r.bucket[0]}x{r.bucket[1]}" if r.bucket else "-"
        caption = "-" if r.caption_file is None else r.caption_file + (
            "" if r.caption_has_identifier is None else " (identifier)" if r.caption_has_identifier else " (NO identifier)")
        exif = "-" if r.exif_rotated is None else "yes" if r.exif_rotated else "no"
        mode = "-" if r.mode is None else r.mode if not r.converted else f"{r.mode}>"
        lines.append(f"{r.file[:28]:28s} {size:>11s} {r.aspect or 0:6.3f} {bucket:>9s} {r.upscale or 0:7.2f} "
                     f"{r.blur if r.blur is not None else 0:8.1f} {exif:>4s} {mode:>5s} {caption}")
    if report.class_folder:
        c = report.class_folder
        lines.append(f"class folder {c['path']}: {c['status']}" + "".join(
            f"; {f['folder']}: {f['status']}, {f['images']} images" for f in c.get("folders", [])))
    lines += [f"error: {m}" for m in report.errors] + [f"warning: {m}" for m in report.warnings]
    lines.append(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return "\n".join(lines)


THUMB = 128  # pixels on the longer side of a contact-sheet crop
_RED, _ORANGE, _GREEN = (220, 30, 30), (240, 150, 0), (40, 160, 60)


def contact_sheet(report: Report, crops: dict[str, Image.Image], path: str | Path, per_row: int = 8) -> Path:
    """A PNG of the training crops, one block per bucket, outlined red (error), orange (warning) or green."""
    by_bucket: dict[str, list] = {}
    for r in report.images:
        key = f"{r.bucket[0]}x{r.bucket[1]}" if r.bucket else "unreadable"
        by_bucket.setdefault(key, []).append(r)
    cell_w, cell_h, header = THUMB + 12, THUMB + 36, 20
    width = cell_w * per_row + 8
    rows = [(key, items[i:i + per_row]) for key, items in sorted(by_bucket.items()) for i in range(0, len(items), per_row)]
    sheet = Image.new("RGB", (width, sum(header + cell_h for _ in rows) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    y = 4
    for n, (key, items) in enumerate(rows):
        more = n > 0 and rows[n - 1][0] == key
        draw.text((6, y + 4), f"bucket {key} (height x width): {len(by_bucket[key])} photo(s)" + (" (continued)" if more else ""),
                  fill="black")
        y += header
        for i, r in enumerate(items):
            x = 4 + i * cell_w
            color = _RED if r.errors else _ORANGE if r.warnings else _GREEN
            draw.rectangle((x, y, x + cell_w - 4, y + THUMB + 8), outline=color, width=4)
            if r.file in crops:
                thumb = ImageOps.contain(crops[r.file], (THUMB, THUMB))
                sheet.paste(thumb, (x + 4 + (THUMB - thumb.width) // 2, y + 4 + (THUMB - thumb.height) // 2))
            else:
                draw.text((x + 10, y + THUMB // 2), "unreadable", fill=_RED)
            draw.text((x + 2, y + THUMB + 10), r.file[:22], fill="black")
            if r.errors or r.warnings:
                draw.text((x + 2, y + THUMB + 22), (r.errors or r.warnings)[0][:22], fill=color)
        y += cell_h
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def log_short_report(subject, concepts, data: DataConfig, buckets: list[Size] | None, check_identifier: bool = True) -> None:
    """`train`'s short form: the bucket counts and each warning, from the photos training already decoded."""
    identifiers = {Path(c.instance_dir).absolute(): c.resolved_identifier for c in concepts} if check_identifier else None
    report, _ = examine([(e.path, e.image, None) for e in subject], data, buckets, identifiers, file_facts=False)
    counts: dict[str, int] = {}
    for r in report.images:
        counts[f"{r.bucket[0]}x{r.bucket[1]}"] = counts.get(f"{r.bucket[0]}x{r.bucket[1]}", 0) + 1
    log.info("doctor: %d photos; %s %s; %d problem(s) (run `dreambooth doctor` on the folder for the full report)",
             len(report.images), "buckets" if buckets else "square crops", ", ".join(f"{k}: {v}" for k, v in counts.items()),
             len(report.errors) + len(report.warnings))
    for message in report.errors + report.warnings:
        log.warning("doctor: %s", message)


def run(args) -> int:
    """`dreambooth doctor`: report, contact sheet, exit status 1 on errors."""
    data = DataConfig(resolution=args.resolution, min_size=args.min_size, caption_extension=args.caption_extension,
                      buckets=args.buckets, bucket_min_side=args.bucket_min_side, bucket_max_side=args.bucket_max_side,
                      bucket_step=args.bucket_step)
    step_factor = args.latent_factor
    family = None
    if args.model:
        from .models.load import detect_family

        family = detect_family(args.model)
        step_factor = family.resolution_step(Path(args.model))
    from .data.buckets import buckets_for

    buckets = buckets_for(data, family, step_factor)
    identifier = args.identifier or (args.instance_prompt.split()[-2] if args.instance_prompt and
                                     len(args.instance_prompt.split()) >= 2 else None)
    report, crops = examine_folder(args.folder, data, buckets, identifier, args.class_dir, args.model,
                                   BLUR_THRESHOLD if args.blur_threshold is None else args.blur_threshold)
    sheet = Path(args.contact_sheet) if args.contact_sheet else Path(args.folder).absolute().with_name(
        Path(args.folder).absolute().name + "-contact-sheet.png")
    contact_sheet(report, crops, sheet)
    if args.json:
        print(json.dumps({**report.to_json(), "contact_sheet": str(sheet)}, indent=2))
    else:
        print(format_report(report))
        print(f"contact sheet: {sheet}")
    return 1 if report.errors else 0
