"""Shared fixtures: a tiny Stable-Diffusion-architecture model folder and a few photos (built by dreambooth.tiny).

The suite runs in parallel (`pytest -n 2`, pytest-xdist): every worker is its own process with its own session
fixtures under its own tmp_path_factory folder, so nothing a test writes may live at a fixed place. Outputs go to
tmp_path; the single-file conversion cache is moved off the home folder below (subprocesses inherit it); ports
come from `free_port`. `-m "not slow"` leaves out the few tests marked slow (the miniature world's quality runs,
whole-CLI runs, the browser, the two-process launches) for a quick loop while developing.
"""

import os
import shutil
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from dreambooth.tiny import RESOLUTION, build_tiny_sd, write_photos  # noqa: F401  (re-exported for tests)


def pytest_configure(config):
    # With -n, xdist hands each worker a quarter of the suite up front; one test at a time instead lets the
    # slow tests, which come first (below), spread over the workers while the short ones fill in behind them.
    if getattr(config.option, "maxschedchunk", "no xdist") is None:
        config.option.maxschedchunk = 1


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by parametrized fixtures, which a stable sort keeps
def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that two workers finish together instead of one running a long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def private_conversion_cache(tmp_path_factory):
    """$DREAMBOOTH_CACHE (interop.single_file.cache_root) in this worker's temporary folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DREAMBOOTH_CACHE", str(tmp_path_factory.mktemp("dreambooth-cache")))
        yield


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port nobody holds now (for servers and torchrun's rendezvous; no fixed port to collide on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
