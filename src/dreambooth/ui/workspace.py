"""The workspace root and the checks that keep the UI inside it.

Every path a browser can name (a model, a photo folder, a run) is resolved against the root given
at start-up and refused if it leads outside it, through `..`, an absolute path or a symlink.
Uploaded files keep only a sanitised form of their base name. Nothing here unpickles: models are
diffusers folders or .safetensors files, runs are read through their YAML, JSON and PNG files.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..data.images import IMAGE_EXTENSIONS, list_images, load_image
from ..errors import DreamBoothError

# The bundled miniature base model (package data, read only): a model a new user can pick without
# downloading one. It is the one path outside the workspace the UI may read.
BUNDLED_MODELS = {"miniworld base (bundled, 32 px)": "miniworld:base"}


class Workspace:
    """A folder the UI works in: uploads, runs and models live below it, nothing outside is touched."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DreamBoothError(f"workspace {root} is not a folder; create it or pass another --root")

    def resolve(self, path: str | Path, what: str = "path") -> Path:
        """`path` (relative to the root, or absolute) as an absolute path inside the root, else raise."""
        text = str(path).strip()
        if not text:
            raise DreamBoothError(f"the {what} is empty")
        candidate = Path(text).expanduser()
        full = (candidate if candidate.is_absolute() else self.root / candidate).resolve()  # follows symlinks
        if full != self.root and self.root not in full.parents:
            raise DreamBoothError(f"the {what} {text!r} is outside the workspace {self.root}; "
                                  "the UI only reads and writes inside it (start it with --root to choose another)")
        return full

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix() or "."

    def model_path(self, choice: str) -> str:
        """A model choice from the form: a bundled model's name, or a path inside the workspace."""
        if choice in BUNDLED_MODELS:
            from ..miniworld.evaluate import DEFAULT_BASE

            return str(DEFAULT_BASE)
        path = self.resolve(choice, "model")
        if path.is_dir() and (path / "model_index.json").is_file():
            return str(path)
        if path.is_file() and path.suffix == ".safetensors":
            return str(path)
        raise DreamBoothError(f"{choice!r} is neither a diffusers model folder (with model_index.json) nor a "
                              ".safetensors file; pickle .ckpt files are not loaded from the UI")

    def find_models(self, max_depth: int = 3) -> list[str]:
        """Diffusers folders and single .safetensors checkpoints below the root, as relative paths."""
        found = []
        for path in _walk(self.root, max_depth):
            if path.name == "model_index.json" and not _inside_run(path.parent):
                found.append(self.relative(path.parent))
            elif path.suffix == ".safetensors" and _looks_single_file(path):
                found.append(self.relative(path))
        return sorted(set(found))

    def find_runs(self, max_depth: int = 3) -> list[str]:
        """Training outputs below the root: folders with the config.yaml that training writes."""
        runs = [self.relative(p.parent) for p in _walk(self.root, max_depth + 1)
                if p.name == "config.yaml" and ((p.parent / "logs").is_dir() or (p.parent / "checkpoints").is_dir())]
        return sorted(set(runs))


def _walk(root: Path, max_depth: int):
    """Files up to `max_depth` folders down, sorted, hidden folders and checkpoints skipped."""
    def visit(folder: Path, depth: int):
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.is_symlink():
                if depth < max_depth and entry.name not in {"checkpoints", "samples", "logs", "cache", "class_images"}:
                    yield from visit(entry, depth + 1)
            elif entry.is_file():
                yield entry
    yield from visit(root, 0)


def _inside_run(folder: Path) -> bool:
    return (folder / "logs").is_dir()  # a full fine-tune's output is a pipeline too; it is listed as a run


def _looks_single_file(path: Path) -> bool:
    """A whole-model .safetensors (not a part of a diffusers folder, a LoRA or a checkpoint's weights)."""
    if (path.parent / "config.json").is_file() or (path.parent / "model_index.json").is_file():
        return False
    return not path.name.startswith(("pytorch_lora_weights", "trainable"))


# ---- uploads -----------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_filename(name: str) -> str:
    """A safe base name for an uploaded file: no folders, no leading dots, only [A-Za-z0-9._-].

    '../../etc/passwd' -> 'passwd'; 'C:\\photos\\my dog.JPG' -> 'my_dog.JPG'; '..' -> 'upload'.
    """
    base = re.split(r"[\\/]", unicodedata.normalize("NFKC", name))[-1]
    base = _UNSAFE.sub("_", base).lstrip("._-")[:120]
    return base or "upload"


@dataclass
class UploadReport:
    saved: list[str]
    refused: list[str]  # one message per refused file

    def message(self) -> str:
        lines = [f"added {len(self.saved)} photo(s)" + (f": {', '.join(self.saved)}" if self.saved else "")]
        lines += [f"refused {m}" for m in self.refused]
        return "\n".join(lines)


def save_uploads(files: list[tuple[str, Path]], folder: Path) -> UploadReport:
    """Copy uploaded files (original name, temporary path) into `folder` under sanitised names.

    Only image extensions are accepted; the decode check comes later, with every other problem,
    in `check_photos`. An existing file of the same name is not overwritten: a suffix is added.
    """
    folder.mkdir(parents=True, exist_ok=True)
    report = UploadReport([], [])
    for original, tmp in files:
        name = sanitize_filename(original)
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            report.refused.append(f"{original!r}: not an image file (use {', '.join(sorted(IMAGE_EXTENSIONS))})")
            continue
        target = folder / name
        stem, suffix, n = target.stem, target.suffix, 1
        while target.exists():
            target = folder / f"{stem}-{n}{suffix}"
            n += 1
        assert target.parent == folder  # sanitize_filename leaves no separators
        shutil.copyfile(tmp, target)
        report.saved.append(target.name + (f" (from {original!r})" if target.name != original else ""))
    return report


@dataclass
class PhotoCheck:
    good: list[Path]
    problems: list[str]  # one line per problem, naming the file

    @property
    def ok(self) -> bool:
        return bool(self.good) and not self.problems


def check_photos(folder: Path, min_size: int) -> PhotoCheck:
    """Decode every photo as training will (`load_image`) and collect every problem, not only the first."""
    try:
        paths = list_images(folder)
    except DreamBoothError as exc:
        return PhotoCheck([], [str(exc)])
    good, problems = [], []
    for path in paths:
        try:
            load_image(path, min_size=min_size)
            good.append(path)
        except DreamBoothError as exc:
            problems.append(str(exc))
    return PhotoCheck(good, problems)
