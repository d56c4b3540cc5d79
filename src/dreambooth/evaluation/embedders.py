"""Image and text embeddings from local DINO and CLIP folders, for DreamBench's metrics.

The DreamBooth paper (Ruiz et al. 2022, section 4.1) scores subject fidelity with the CLS
embedding of a self-supervised ViT-S/16 (DINO, `facebook/dino-vits16`) and with CLIP image
embeddings, and prompt fidelity with CLIP image-text similarity. Nothing is downloaded here: each
model is a folder the user fetched beforehand, checked before use, so a wrong or missing folder
fails in one line that names the path and the fix.

Images are prepared by the folder's own image processor (`preprocessor_config.json`, read with
`AutoImageProcessor`); a folder without one gets the model's published preprocessing, built from
its config (DINO: resize to the model's input size, ImageNet mean and std; CLIP: shortest side
then centre crop, CLIP's mean and std).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DreamBoothError

log = logging.getLogger("dreambooth")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO's normalisation
DOWNLOAD_HINT = {
    "dino": "huggingface-cli download facebook/dino-vits16 --local-dir PATH",
    "clip": "huggingface-cli download openai/clip-vit-large-patch14 --local-dir PATH",
}


def _check_folder(path: str | Path, kind: str, model_types: tuple[str, ...]) -> Path:
    """`path` must be a transformers folder whose config.json names one of `model_types`."""
    path = Path(path)
    fix = f"fetch it once on a machine with internet ({DOWNLOAD_HINT[kind]}) and pass that folder as --{kind}"
    if not path.is_dir():
        raise DreamBoothError(f"--{kind} {path}: no such folder; {fix}")
    config = path / "config.json"
    if not config.is_file():
        raise DreamBoothError(f"--{kind} {path} has no config.json, so it is not a transformers model folder; {fix}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise DreamBoothError(f"--{kind} {config} is not valid JSON ({e}); {fix}") from None
    if model_type not in model_types:
        raise DreamBoothError(f"--{kind} {path} holds a {model_type or 'unknown'} model, not {kind.upper()} "
                              f"(config.json model_type should be {' or '.join(model_types)}); {fix}")
    return path


def _processor(path: Path, fallback):
    """The folder's own image processor when it has one, else `fallback()` (the model's published preprocessing)."""
    from transformers import AutoImageProcessor

    if (path / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path)
    log.warning("%s has no preprocessor_config.json: using the model's published preprocessing", path)
    return fallback()


def _load(kind: str, path: Path, loader):
    try:
        return loader()
    except Exception as e:  # from_pretrained raises many types; the user needs the path and what to do
        first = str(e).splitlines()[0] if str(e) else ""
        raise DreamBoothError(f"--{kind} {path} could not be loaded ({type(e).__name__}: {first}); is the folder "
                              "complete? re-download it") from e


@torch.no_grad()
def _embed_images(processor, device, images: list, features, batch_size: int) -> torch.Tensor:
    """Images (PIL) -> (N, D) L2-normalised rows: `processor` prepares each batch, `features` embeds it."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor(images=[im.convert("RGB") for im in images[i : i + batch_size]],
                           return_tensors="pt")["pixel_values"].to(device)  # (B, 3, H, W)
        out.append(features(pixels).float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


class DinoEmbedder:
    """A ViT (DINO) folder -> CLS embeddings, L2-normalised: `embed(images)` is (N, D)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import ViTImageProcessor, ViTModel

        self.path = _check_folder(path, "dino", ("vit",))
        self.model = _load("dino", self.path, lambda: ViTModel.from_pretrained(self.path, add_pooling_layer=False))
        self.model.eval().to(device)
        size = self.model.config.image_size
        self.processor = _processor(self.path, lambda: ViTImageProcessor(
            size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD))

    def embed(self, images: list, batch_size: int = 32) -> torch.Tensor:
        return _embed_images(self.processor, self.model.device, images,  # the CLS token of the last layer
                             lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0], batch_size)


def _features(output) -> torch.Tensor:
    # transformers < 5 returns the projected features; 5.x a model output whose pooler_output holds them
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """A CLIP folder -> image and text embeddings in CLIP's joint space, L2-normalised."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.path = _check_folder(path, "clip", ("clip",))
        self.model = _load("clip", self.path, lambda: CLIPModel.from_pretrained(self.path))
        self.model.eval().to(device)
        self.tokenizer = _load("clip", self.path, lambda: AutoTokenizer.from_pretrained(self.path))
        size = self.model.config.vision_config.image_size
        self.processor = _processor(self.path, lambda: CLIPImageProcessor(size={"shortest_edge": size},
                                                                           crop_size={"height": size, "width": size}))

    def embed(self, images: list, batch_size: int = 32) -> torch.Tensor:
        return _embed_images(self.processor, self.model.device, images,  # projected into the joint space
                             lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)), batch_size)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return F.normalize(_features(self.model.get_text_features(**tokens)).float().cpu(), dim=-1)  # (N, D)
