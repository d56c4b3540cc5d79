"""Shared fixtures: a tiny Stable-Diffusion-architecture model folder and a few photos (built by dreambooth.tiny)."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from dreambooth.tiny import RESOLUTION, build_tiny_sd, write_photos  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture
def model_dir(tiny_sd_dir, tmp_path) -> Path:
    """A private copy of the tiny model, for tests that modify or break the folder."""
    return Path(shutil.copytree(tiny_sd_dir, tmp_path / "tiny-sd"))


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    write_photos(folder, 5)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from dreambooth.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_if_dir(tmp_path_factory) -> Path:
    from dreambooth.tiny import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("models") / "tiny-if", stage=1)


@pytest.fixture(scope="session")
def tiny_if2_dir(tmp_path_factory) -> Path:
    from dreambooth.tiny import build_tiny_if

    return build_tiny_if(tmp_path_factory.mktemp("models") / "tiny-if-ii", stage=2)
