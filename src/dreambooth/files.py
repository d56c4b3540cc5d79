"""Crash-safe file writes: one helper for single files, one for whole folders, one for replacing a set of entries.

A single file is written beside its target and renamed over it (`os.replace` is atomic on one
file system); a folder that is written whole (a checkpoint) is built beside its target the same
way and renamed into place. An export replaces several entries of the output folder at once (unet/, vae/,
model_index.json, README.md, ...), and no single rename can do that while the folder also holds
the run's checkpoints, logs and samples. `swap_in` makes it atomic in effect with a journal, as a
database does: the new entries are written completely first, then a journal naming them is
written, then the entries move; `finish_swap`, which every reader of an output folder calls
first, completes a move that a kill interrupted. Readers never see old and new parts mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

JOURNAL = ".swap-journal.json"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer of its own (safetensors' save_file) to write to; renamed to
    `path` when the block ends without an error, so `path` appears complete or not at all."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")  # class_images.py recognises its own leftovers by this name
    yield tmp
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, so a crash never leaves a partial file."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Build a folder that appears at `path` complete or not at all.

    Yields an empty staging folder beside `path` (`.tmp-<name>`, left over by a killed run and
    cleared on the next try) to write into; when the block ends without an error, any old `path`
    is removed and the staging folder is renamed to it. After an error the staging folder stays and
    `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    _remove(path)
    os.replace(tmp, path)


def swap_in(staged: Path, target: Path, stale: tuple[str, ...] = ()) -> None:
    """Move every entry of the complete folder `staged` into `target`, replacing same-named entries.

    `stale`: names in `target` that belong to the previous export but not to this one (a full
    model replaced by LoRA weights, say); they are removed as part of the same swap.
    """
    names = sorted(p.name for p in staged.iterdir())
    remove = sorted(n for n in stale if n not in names and (target / n).exists())
    atomic_write_text(target / JOURNAL, json.dumps({"staged": staged.name, "entries": names, "remove": remove}))
    finish_swap(target)


def finish_swap(target: Path) -> None:
    """Complete a swap that `swap_in` started in `target` (no-op when there is none).

    Each step can be repeated after a kill: an entry still in the staging folder has not moved
    yet, so its old counterpart is deleted and it is moved; an entry already moved is left alone.
    """
    target = Path(target)
    journal = target / JOURNAL
    if not journal.is_file():
        return
    plan = json.loads(journal.read_text())
    staged = target / plan["staged"]
    for name in plan["entries"]:
        source = staged / name
        if not source.exists():
            continue  # moved before the interruption
        _remove(target / name)
        os.replace(source, target / name)
    for name in plan["remove"]:
        _remove(target / name)
    journal.unlink()
    shutil.rmtree(staged, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
