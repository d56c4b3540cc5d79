"""Class images for prior preservation: generate them once, track where they came from.

DreamBooth's prior-preservation loss trains on images of the generic class ("a photo of a dog")
made by the base model itself, so that fine-tuning on a few photos of one dog does not make every
dog look like it. Generating hundreds of them is the slowest part of setup, so this module:

- names each file by content hash and records its provenance (model fingerprint, prompt, sampler
  settings, seed) in `class_dir/manifest.jsonl`;
- reuses every image whose provenance still matches, without loading the model;
- deletes and regenerates images made with other settings (they would teach the wrong prior);
- gives image i the seed `settings.seed + i`, and rewrites the manifest after each batch, so an
  interrupted run resumes where it stopped and produces the same images.

A folder of the user's own class images (`user_supplied=True`) is used as it is and never touched.
"""

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from dreambooth import sampling
from dreambooth.data.images import IMAGE_EXTENSIONS, image_files, read_caption
from dreambooth.errors import DreamBoothError
from dreambooth.files import atomic_write_bytes

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger("dreambooth")

MANIFEST = "manifest.jsonl"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
_NAME = re.compile(r"class_(\d{5,})_[0-9a-f]{10}\.png")
_CHUNK = 1 << 20  # 1 MiB

# (resolved model dir, ((relative path, size, mtime_ns), ...)) -> sha256 hex
_fingerprints: dict[tuple, str] = {}


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash a model's weights, to tell which model made an image.

    The sha256 covers every *.safetensors, *.bin, *.ckpt and *.pt file under `model_dir`
    (recursively, in order of relative POSIX path), feeding each file's relative path, then its
    contents. Config files are left out: they do not change what the weights compute in ways
    that matter here, and tools rewrite them freely. SD weights are gigabytes, so the result is
    remembered for this process, keyed on each file's size and modification time.

    Args:
        model_dir (str | Path): A diffusers model folder (or any folder holding weight files).

    Returns:
        str: 64 hex digits.

    Raises:
        DreamBoothError: If the folder holds no weight file.
    """
    root = Path(model_dir).resolve()
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()
    )
    if not files:
        raise DreamBoothError(
            f"{root} holds no weight files (*.safetensors, *.bin, *.ckpt, *.pt); "
            "point the model path at a diffusers model folder"
        )
    stats = tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in ((r, p.stat()) for r, p in files))
    key = (str(root), stats)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for (rel, path), (_, size, _) in zip(files, stats):
            # Path and size delimit each file, so moving bytes between files changes the hash.
            digest.update(f"{rel}\0{size}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


@dataclass(frozen=True)
class ClassImageSettings:
    """How class images are made. Every field except `batch_size` is recorded per image."""

    prompt: str
    """The class prompt, e.g. "a photo of a dog"."""
    num_images: int
    """How many class images training needs (diffusers' script uses 100-200 per concept)."""
    resolution: int
    """Square image size in pixels; the training resolution (a multiple of the model's latent factor)."""
    scheduler: str = "dpm++"
    """Sampler name, one of `sampling.SCHEDULERS`."""
    num_inference_steps: int = 25
    """Denoising steps per image (25 is plenty for DPM++)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    negative_prompt: str | None = None
    """Optional negative prompt, e.g. "blurry, low quality"."""
    seed: int = 0
    """Image i is generated with seed `seed + i`."""
    batch_size: int = 4
    """Images per pipeline call; a memory/speed trade-off that does not change the images."""
    size: tuple[int, int] | None = None
    """(height, width) of a non-square aspect-ratio bucket; None = `resolution` square."""
    prompts: tuple[str, ...] = ()
    """Caption-diverse class images: image i is made with `prompts[i % len(prompts)]` (and trains with it,
    `image_prompts`); empty = `prompt` for every image."""

    def prompt_of(self, index: int) -> str:
        """The prompt image `index` is made with."""
        return self.prompts[index % len(self.prompts)] if self.prompts else self.prompt

    def __post_init__(self):
        for name in ("num_images", "resolution", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise DreamBoothError(f"class images: `{name}` must be >= 1, got {getattr(self, name)}")
        # (the resolution's multiple is the model's latent factor: models.load.check_resolution)
        if self.scheduler not in sampling.SCHEDULERS:
            raise DreamBoothError(
                f"class images: unknown `scheduler` {self.scheduler!r}; "
                f"choose one of: {', '.join(sampling.SCHEDULERS)}"
            )


def ensure_class_images(
    model_dir: str | Path,
    class_dir: str | Path,
    settings: ClassImageSettings,
    *,
    user_supplied: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    load_pipeline: "Callable[[], DiffusionPipeline] | None" = None,
) -> list[Path]:
    """Make sure `class_dir` holds `settings.num_images` class images, and return their paths.

    Images whose manifest entry matches `settings` and this model are reused; stale ones are
    deleted and regenerated; only missing indices are generated. The model is loaded only if
    something must be generated.

    Args:
        model_dir (str | Path): The base model folder the images must come from.
        class_dir (str | Path): Where the class images live; created if missing.
        settings (ClassImageSettings): Prompt, count and sampler settings.
        user_supplied (bool): The folder holds the user's own class images: use them as they
            are (up to `num_images`), never generate or delete anything.
        device (str | torch.device): Where to run the pipeline.
        dtype (torch.dtype): Weight dtype for the pipeline (float16 halves memory on GPU).
        load_pipeline (Callable | None): Returns a ready pipeline; defaults to
            `DiffusionPipeline.from_pretrained(model_dir)` on `device`. Tests pass their own.

    Returns:
        list[Path]: The images for indices 0..num_images-1, sorted (for user-supplied folders:
        the first `num_images` image files by name, or all of them if there are fewer).

    Raises:
        DreamBoothError: If a user-supplied folder has no images, or a managed folder holds
            image files that are not in its manifest.
    """
    class_dir = Path(class_dir)
    if user_supplied:
        return _user_images(class_dir, settings.num_images)

    class_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftover_tmp(class_dir)
    fingerprint = model_fingerprint(model_dir)
    entries = _read_manifest(class_dir)
    _check_no_strangers(class_dir, entries)
    expected = _provenance(settings, fingerprint)

    kept: dict[int, dict] = {}
    stale: list[tuple[dict, list[str]]] = []
    for entry in entries:
        index = _index_of(entry)
        if index is None or index in kept:
            # A hand-edited manifest: the entry cannot be placed, so treat it as stale.
            stale.append((entry, ["file name" if index is None else "duplicate index"]))
            continue
        if not (class_dir / entry["file"]).is_file():
            continue  # deleted by hand: just regenerate it
        differs = [k for k, v in expected.items() if entry.get(k) != v]
        if entry.get("prompt") != settings.prompt_of(index):
            differs.append("prompt")
        if entry.get("seed") != settings.seed + index:
            differs.append("seed")
        if differs:
            stale.append((entry, differs))
        else:
            kept[index] = entry
    if stale:
        _drop_stale(class_dir, stale)
    if len(kept) != len(entries):
        _write_manifest(class_dir, kept)  # record the pruning even if nothing is generated

    missing = [i for i in range(settings.num_images) if i not in kept]
    if missing:
        _generate(model_dir, class_dir, settings, expected, kept, missing, load_pipeline, device, dtype)
    return [class_dir / kept[i]["file"] for i in range(settings.num_images)]


def _provenance(settings: ClassImageSettings, fingerprint: str) -> dict:
    """The manifest fields (all but "file", "prompt" and "seed", which depend on the index) an image must match to be reused."""
    return {
        "model": fingerprint,
        "negative_prompt": settings.negative_prompt,
        "scheduler": settings.scheduler,
        "steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "resolution": settings.resolution,
        # Only bucketed images record a size, so square images made before buckets existed stay valid.
        **({"size": list(settings.size)} if settings.size is not None else {}),
    }


def _generate(model_dir, class_dir, settings, expected, kept, missing, load_pipeline, device, dtype):
    """Generate the `missing` indices batch by batch, saving files and manifest after each."""
    pipe = load_pipeline() if load_pipeline is not None else _load_pipeline(model_dir, device, dtype)
    sampling.set_scheduler(pipe, settings.scheduler, "prior.scheduler")  # through the schedule its config records
    logger.info("generating %d class images in %s", len(missing), class_dir)
    with tqdm(total=len(missing), desc="class images", unit="img") as bar:
        for start in range(0, len(missing), settings.batch_size):
            indices = missing[start : start + settings.batch_size]
            images = sampling.generate(
                pipe,
                [settings.prompt_of(i) for i in indices],
                [settings.seed + i for i in indices],
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                negative_prompt=settings.negative_prompt,
                height=settings.size[0] if settings.size else settings.resolution,
                width=settings.size[1] if settings.size else settings.resolution,
                batch_size=settings.batch_size,
            )
            for i, image in zip(indices, images):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                data = buf.getvalue()
                name = f"class_{i:05d}_{hashlib.sha256(data).hexdigest()[:10]}.png"
                atomic_write_bytes(class_dir / name, data)
                kept[i] = {"file": name, **expected, "prompt": settings.prompt_of(i), "seed": settings.seed + i}
            _write_manifest(class_dir, kept)
            bar.update(len(indices))


def image_prompts(files: list[Path], default: str) -> list[str]:
    """The prompt each class image trains with: the one its folder's manifest says it was made with (caption-diverse
    class images, `ClassImageSettings.prompts`); for the user's own images, a caption file beside it, else `default`."""
    manifests: dict[Path, dict[str, str]] = {}
    prompts = []
    for path in files:
        if path.parent not in manifests:
            manifests[path.parent] = {e.get("file"): e.get("prompt") for e in _read_manifest(path.parent)}
        prompts.append(manifests[path.parent].get(path.name) or read_caption(path) or default)
    return prompts


def _load_pipeline(model_dir, device, dtype):
    """Load the base model as a text-to-image pipeline, without the NSFW safety checker."""
    from diffusers import DiffusionPipeline  # deferred: importing pipelines costs seconds

    kwargs = {}
    index = Path(model_dir) / "model_index.json"
    # Only SD 1.x/2.x pipelines have a safety checker; passing the argument to others warns.
    # Class images are never shown to anyone, and the checker blacks out false positives.
    if index.is_file() and "safety_checker" in json.loads(index.read_text()):
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(model_dir, dtype=dtype, **kwargs)  # torch_dtype= is deprecated
    return pipe.to(device)


def _user_images(class_dir: Path, num_images: int) -> list[Path]:
    """The first `num_images` image files of a user's folder, sorted by name."""
    images = image_files(class_dir) if class_dir.is_dir() else []
    if not images:
        raise DreamBoothError(
            f"{class_dir} holds no class images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add images there, "
            "or set the concept's `class_images_user_supplied: false` to generate them"
        )
    if len(images) < num_images:
        logger.warning(
            "%s holds %d class images but %d were asked for; using the %d there",
            class_dir, len(images), num_images, len(images),
        )
    return images[:num_images]


def _index_of(entry: dict) -> int | None:
    """The image index encoded in an entry's file name, or None if the name is not ours."""
    match = _NAME.fullmatch(str(entry.get("file", "")))
    return int(match.group(1)) if match else None


def _check_no_strangers(class_dir: Path, entries: list[dict]) -> None:
    """Refuse to manage a folder holding images we did not make: we might delete them."""
    ours = {entry.get("file") for entry in entries}
    strangers = [p for p in image_files(class_dir) if p.name not in ours]
    if strangers:
        raise DreamBoothError(
            f"{class_dir} holds {len(strangers)} image files not listed in its {MANIFEST} "
            f"(e.g. {strangers[0].name}); to train with them as they are, set the concept's "
            "`class_images_user_supplied: true`; otherwise move them out so the folder can be "
            "managed (generated, checked and regenerated) automatically"
        )


def _drop_stale(class_dir: Path, stale: list[tuple[dict, list[str]]]) -> None:
    """Warn about and delete images made with other settings; they are ours (in the manifest)."""
    by_reason: dict[tuple[str, ...], int] = {}
    for entry, differs in stale:
        by_reason[tuple(differs)] = by_reason.get(tuple(differs), 0) + 1
        name = str(entry.get("file", ""))
        # Never follow a manifest entry out of the folder.
        if _NAME.fullmatch(name) and (class_dir / name).is_file():
            (class_dir / name).unlink()
    for differs, count in by_reason.items():
        if differs in (("file name",), ("duplicate index",)):
            what = f"have a manifest entry with a bad {differs[0]}"
        else:
            what = f"were made with another {'/'.join(differs)}"
        logger.warning("%d class images in %s %s; regenerating them", count, class_dir, what)


def _read_manifest(class_dir: Path) -> list[dict]:
    path = class_dir / MANIFEST
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DreamBoothError(
                f"{path} line {number} is not valid JSON ({err.msg}); fix the line, or delete "
                f"{MANIFEST} and move the images out to regenerate them"
            ) from err
        if not isinstance(entry, dict):
            raise DreamBoothError(
                f"{path} line {number} is not a JSON object; fix the line, or delete "
                f"{MANIFEST} and move the images out to regenerate them"
            )
        entries.append(entry)
    return entries


def _write_manifest(class_dir: Path, entries: dict[int, dict]) -> None:
    lines = [json.dumps(entries[i], sort_keys=True) + "\n" for i in sorted(entries)]
    atomic_write_bytes(class_dir / MANIFEST, "".join(lines).encode("utf-8"))


def _remove_leftover_tmp(class_dir: Path) -> None:
    """Delete half-written files (ours by name) left by a run killed mid-write."""
    for tmp in sorted(class_dir.glob("*.tmp")):
        if tmp.name == MANIFEST + ".tmp" or _NAME.fullmatch(tmp.name.removesuffix(".tmp")):
            tmp.unlink()
