"""The measuring device: a small CNN that reads a 32x32 image's shape, colour, background and subject.

Heads (label spaces from `world`):
    shape       world shapes + the subjects' shapes            (ALL_SHAPES)
    colour      world colours + the subjects' patterns         (ALL_COLOURS)
    background  the world's backgrounds                        (ALL_BACKGROUNDS)
    subject     "none" or which held-out subject (its shape AND its pattern)

The recipe that trains it is `recipes.train_classifier`; the committed weights are in
src/dreambooth/miniworld/assets/classifier (model.safetensors + config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import world

HEADS = {
    "shape": world.ALL_SHAPES,
    "colour": world.ALL_COLOURS,
    "background": world.ALL_BACKGROUNDS,
    "subject": world.SUBJECT_LABELS,
}


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> {head: logits (N, classes)}."""

    def __init__(self, width: int = 32, heads: dict[str, tuple[str, ...]] = HEADS):
        super().__init__()
        self.width = width
        self.labels = {k: tuple(v) for k, v in heads.items()}
        w = width
        self.features = nn.Sequential(
            _block(3, w), _block(w, w), nn.MaxPool2d(2),  # (N, w, 16, 16)
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),  # (N, 2w, 8, 8)
            _block(2 * w, 4 * w), nn.MaxPool2d(2),  # (N, 4w, 4, 4)
            nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True), nn.Dropout(0.1),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in self.labels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Images (N, 3, 32, 32) in [-1, 1] -> {head: predicted label per image}."""
        self.eval()
        out: dict[str, list[str]] = {k: [] for k in self.labels}
        for i in range(0, len(x), batch_size):
            logits = self(x[i : i + batch_size].float())
            for k, v in logits.items():
                out[k] += [self.labels[k][j] for j in v.argmax(1).tolist()]
        return out

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"width": self.width, "heads": self.labels}, indent=2) + "\n")


def load_classifier(folder: str | Path) -> AttributeClassifier:
    """Load a saved classifier (fp16 on disk -> float32 in memory), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no classifier (config.json); train one with "
                                "`python scripts/miniworld_pretrain.py --stage classifier`")
    config = json.loads((folder / "config.json").read_text())
    model = AttributeClassifier(config["width"], {k: tuple(v) for k, v in config["heads"].items()})
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / "model.safetensors").items()})
    return model.eval()
