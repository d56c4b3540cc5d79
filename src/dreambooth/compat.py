"""Start-up compatibility check: can the installed packages do what these settings ask?

`check_environment(cfg)` runs before the model is loaded and before any class image is made. It
probes only what the chosen settings need, using the minimum versions the libraries themselves
declare (so the check moves with them), and fails with one line naming the packages, their
versions and the fix. Without it, a bad pair (transformers 5.24 with peft 0.21, November 2026)
surfaced as a raw traceback after minutes of class-image generation.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from .config import TrainConfig
from .errors import DreamBoothError

LOCK_HINT = "install the tested versions: pip install -c requirements.lock -e . (see README)"


def installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _at_least(have: str, need: str) -> bool:
    from packaging.version import Version

    return Version(have) >= Version(need)


def _minimum(module: str, attribute: str) -> str | None:
    """A library's own declared minimum (e.g. transformers.integrations.peft.MIN_PEFT_VERSION), if it has one."""
    try:
        return getattr(importlib.import_module(module), attribute, None)
    except ImportError:
        return None


def check_peft(needed_by: str, for_text_encoder: bool) -> None:
    """LoRA goes through diffusers' (UNet) and transformers' (text encoder) peft integrations."""
    peft = installed("peft")
    if peft is None:
        raise DreamBoothError(f"{needed_by} needs peft: pip install peft ({LOCK_HINT})")
    needs = [("diffusers", installed("diffusers"), _minimum("diffusers.utils.constants", "MIN_PEFT_VERSION"))]
    if for_text_encoder:
        needs.append(("transformers", installed("transformers"), _minimum("transformers.integrations.peft", "MIN_PEFT_VERSION")))
    for library, version, minimum in needs:
        if minimum is not None and not _at_least(peft, minimum):
            raise DreamBoothError(f"{needed_by}: {library} {version} needs peft >= {minimum}, but peft {peft} is installed; "
                                  f"upgrade peft, or {LOCK_HINT}")


def check_schedulers(names: dict[str, str]) -> None:
    """Each named sampler builds (LMS needs scipy; diffusers swaps in a stub that raises when it is missing)."""
    from .sampling import SCHEDULERS

    for key, name in names.items():
        try:
            SCHEDULERS[name]()
        except ImportError as err:
            raise DreamBoothError(f"{key}={name} needs a package that is not installed ({' '.join(str(err).split())}); "
                                  f"install it, or choose another sampler") from None


def check_xformers() -> None:
    if installed("xformers") is None:
        raise DreamBoothError("memory.attention=xformers needs xformers: pip install -e '.[xformers]' "
                              "(matching your torch build), or use memory.attention=sdpa")
    try:
        importlib.import_module("xformers.ops")
    except Exception as err:  # a wheel built for another torch fails with many error types
        raise DreamBoothError(f"memory.attention=xformers: xformers {installed('xformers')} does not load with torch "
                              f"{installed('torch')} ({type(err).__name__}); install the build for this torch, or use "
                              "memory.attention=sdpa") from None


def check_environment(cfg: TrainConfig) -> None:
    """Raise a one-line DreamBoothError if the installed packages cannot run `cfg`."""
    from .optim import import_bitsandbytes

    if cfg.train.method == "lora":
        check_peft("train.method=lora" + (" with text-encoder training" if cfg.trains_text_encoder else ""),
                   for_text_encoder=cfg.trains_text_encoder)
    if cfg.optim.optimizer == "adamw8bit":
        import_bitsandbytes("optim.optimizer=adamw8bit", "optim.optimizer=adamw")
    elif cfg.optim.moments_dtype == "int8":
        import_bitsandbytes("optim.moments_dtype=int8", "optim.moments_dtype=bf16")
    if cfg.optim.optimizer in ("prodigy", "lion"):
        package = {"prodigy": "prodigyopt", "lion": "lion-pytorch"}[cfg.optim.optimizer]
        if installed(package) is None:
            raise DreamBoothError(f"optim.optimizer={cfg.optim.optimizer} needs {package}: pip install {package}")
    if cfg.memory.attention == "xformers":
        check_xformers()
    samplers = {"validation.scheduler": cfg.validation.scheduler}
    if cfg.prior.enabled:
        samplers["prior.scheduler"] = cfg.prior.scheduler
    check_schedulers(samplers)
