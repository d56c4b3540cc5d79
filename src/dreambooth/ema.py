"""An exponential moving average (EMA) of the trained weights, used for validation and export.

    average <- decay * average + (1 - decay) * weights        after every optimizer step

Averaging the iterates (Polyak & Juditsky 1992) smooths the noise of the last updates; diffusion
models are routinely sampled from such an average (Ho et al. 2020; Karras et al. 2024, "Analyzing
and Improving the Training Dynamics of Diffusion Models", for the power-function profile that
`ema.warmup` gives). The arithmetic is diffusers' `EMAModel` (`training_utils.py`), one per trained
module; this file only decides what is averaged, when, and how the average is swapped in.

- What: exactly the trainable parameters (all UNet weights, or the LoRA adapters; the text
  encoders that train), in fp32 on the parameters' device, whatever their own dtype.
- When: once per optimizer step. A module that stops training (a text encoder's stop_step) stops
  being averaged and keeps its average. (EMAModel would instead copy the weights of a parameter
  that no longer requires grad into its average, a jump in the middle of the run.)
- Swapped in: `applied()` puts the average into the model for validation and export and puts the
  trained weights back afterwards, bit for bit, so training continues on the raw weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .config import EMAConfig


class WeightAverage:
    """The moving average of a run's `Trainable` parameters; with ema.enabled false, every method is a no-op."""

    def __init__(self, trainable, cfg: EMAConfig):
        from diffusers.training_utils import EMAModel

        self.trainable = trainable
        self.averages = {}
        if not cfg.enabled:
            return
        for name in trainable.modules:
            # min_decay = decay turns diffusers' warm-up (decay n / (n + 9) at update n) off: constant decay
            average = EMAModel(self._params(name), decay=cfg.decay, min_decay=0.0 if cfg.warmup else cfg.decay)
            average.to(dtype=torch.float32)
            self.averages[name] = average

    @property
    def enabled(self) -> bool:
        return bool(self.averages)

    def _params(self, module: str) -> list[torch.nn.Parameter]:
        return list(self.trainable.params[module].values())

    def update(self) -> None:
        """Move the average of every module still training toward its weights (after an optimizer step)."""
        for name, average in self.averages.items():
            params = self._params(name)
            if params[0].requires_grad:  # a frozen text encoder (stop_step) keeps its average
                average.step(params)

    @contextmanager
    def applied(self):
        """The averaged weights in the model inside the block; the trained weights, exactly, after it."""
        for name, average in self.averages.items():
            average.store(self._params(name))  # a CPU copy of the trained weights
            average.copy_to(self._params(name))
        try:
            yield
        finally:
            for name, average in self.averages.items():
                average.restore(self._params(name))

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The averages under the checkpoint's names (`Trainable.named`), and each module's update count."""
        weights = {f"{name}.{k}": shadow for name, average in self.averages.items()
                   for k, shadow in zip(self.trainable.params[name], average.shadow_params)}
        return weights, {name: average.optimization_step for name, average in self.averages.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: dict[str, int]) -> None:
        """Restore what `state_dict` returned (the averages' decays follow from the update counts)."""
        for name, average in self.averages.items():
            with torch.no_grad():
                for k, shadow in zip(self.trainable.params[name], average.shadow_params):
                    shadow.copy_(weights[f"{name}.{k}"])
            average.optimization_step = updates[name]
