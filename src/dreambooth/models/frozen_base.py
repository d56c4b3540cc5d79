"""The frozen base model, whose predictions are the targets of distilled samples.

prior.source=model and knowledge preservation (prior.preserve_weight) train some samples toward
what the base model predicts at the same noisy input and timestep (objective.py). Where that
base comes from depends on what trains:

- LoRA: the base is the training model itself with its adapters switched off (peft's
  `disable_adapters`), so there is no second copy. Switching them back on makes peft set
  `requires_grad` on every adapter; the flags are restored as they were, so a text encoder frozen
  at its stop_step stays frozen.
- Full fine-tune: a frozen copy of each module that trains (the denoiser, and any text encoder
  that trains), made before training changes them and kept beside them on the device in the
  autocast dtype, like the other frozen parts. Memory: one more copy of those weights, e.g. SD
  1.5's UNet 1.7 GB in fp16/bf16 (3.4 GB in fp32) and its text encoder 0.25 GB (0.5 GB), SDXL's
  UNet 5.1 GB (10.3 GB); a text encoder's copy goes back to the CPU once the prompts are encoded.
  Modules that do not train (VAE, frozen text encoders) are shared. Keeping
  the copy on the CPU would move it to the device at every step, so it is not offered.

The base conditions on its own text encoders: when a text encoder trains, each prompt is encoded
once by the frozen one (or with adapters off) and kept, and the family's conditioning is rebuilt
from those embeddings with the same random draws the trained model's conditioning used.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
from typing import Any, Callable

import torch

from .. import objective
from .family import Components


class FrozenBase:
    """The base model's predictions, without gradients. Build it before `setup_trainable` changes the modules."""

    def __init__(self, comps: Components, trained: list[str], lora: bool, prior_from_model: bool = False,
                 sample_steps: int = 4):
        """`prior_from_model`: class samples are distilled too (prior.source=model), not only knowledge-preservation
        ones; `sample_steps`: the steps of the base's own sample that a distilled sample starts from."""
        self.lora, self.trained = lora, list(trained)
        self.prior_from_model, self.sample_steps = prior_from_model, sample_steps
        modules = dict(comps.modules)  # the unwrapped modules: the loop later swaps in accelerate's wrappers
        if not lora:
            modules.update({name: copy.deepcopy(comps.modules[name]).requires_grad_(False).eval() for name in trained})
        self.comps = dataclasses.replace(comps, modules=modules)
        self.text_encoders = [name for name in trained if name in comps.family.text_encoders]
        self.texts: dict[str, dict[str, torch.Tensor]] | None = None  # prompt -> the base encoders' tensors

    def copies(self) -> dict[str, torch.nn.Module]:
        """The frozen copies (full fine-tune; none with LoRA), for the loop to place like the other frozen parts."""
        return {} if self.lora else {name: self.comps.modules[name] for name in self.trained}

    @contextmanager
    def _adapters_off(self):
        if not self.lora:
            yield
            return
        # a text encoder that learns only the identifier's embedding has no adapters (and encodes the
        # class prompt, which lacks the identifier, as the base does)
        modules = [m for m in (self.comps.modules[name] for name in self.trained) if getattr(m, "peft_config", None)]
        flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        for m in modules:
            m.disable_adapters()
        try:
            yield
        finally:
            for m in modules:
                m.enable_adapters()
            for p, flag in flags:
                p.requires_grad_(flag)

    def encode_prompts(self, prompts: list[str]) -> None:
        """Encode `prompts` with the base's text encoders, once each (only needed when a text encoder trains)."""
        if not self.text_encoders:
            return
        with torch.no_grad(), self._adapters_off():
            self.texts = {p: {k: v[0] for k, v in self.comps.family.encode_prompt(self.comps, [p]).items()}
                          for p in sorted(set(prompts))}
        for name in self.text_encoders if not self.lora else ():
            self.comps.modules[name].to("cpu")  # a frozen copy is done once its prompts are encoded

    def predictor(self, batch, x0: torch.Tensor, cond: dict[str, Any],
                  generator_state: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """objective.diffusion_loss's `teacher` for this batch: (x_t, t, rows) -> the base's prediction for the
        samples of the (N,) mask `rows`, given their x_t and t (M rows).

        `cond` is the trained model's conditioning, reused when no text encoder trains (the text tensors
        are the base's own); `generator_state` is the step generator's state before that conditioning
        was built, so a rebuilt one draws the same numbers (an upscaler's noise augmentation).
        """
        family, n = self.comps.family, x0.shape[0]
        built: dict[str, dict] = {}  # the base's conditioning, built on the first call

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            if "cond" not in built:
                built["cond"] = cond
                if self.texts is not None:
                    prompts = [e.prompt for e in batch.examples]
                    text = {k: torch.stack([self.texts[p][k] for p in prompts]) for k in self.texts[prompts[0]]}
                    built["cond"] = family.conditioning(self.comps, text, batch, x0,
                                                        torch.Generator().set_state(generator_state))
            with torch.no_grad(), self._adapters_off():
                return family.predict(self.comps, noisy, timesteps, _rows(built["cond"], rows, n))

        return predict


    def distill(self, batch, x0: torch.Tensor, cond: dict[str, Any], cond_state: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, Callable | None, torch.Tensor | None]:
        """A micro-batch's distilled samples: (x0, teacher, rows) for `objective.diffusion_loss`.

        The rows (class samples with prior.source=model, knowledge-preservation samples) take as their
        clean input the base's own sample for their prompt, drawn from the step's generator, and as their
        target the base's prediction (`predictor`). `cond_state` is the generator's state before `cond`
        was built. Without such rows in the batch, x0 comes back as it was and teacher/rows are None."""
        teacher = self.predictor(batch, x0, cond, cond_state)
        rows = objective.distilled_samples(batch.is_prior, batch.is_preserve, self.prior_from_model)
        if rows is None:
            return x0, teacher, None
        x0 = x0.clone()
        x0[rows] = objective.base_samples(teacher, self.comps.schedule, x0.shape, rows, generator, self.sample_steps,
                                          x0.device).to(x0.dtype)
        return x0, teacher, rows


def _rows(value, rows: torch.Tensor, n: int):
    """The per-sample entries of a conditioning (tensors whose first dimension is the batch, in nested dicts) for `rows`."""
    if isinstance(value, dict):
        return {k: _rows(v, rows, n) for k, v in value.items()}
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return value[rows.to(value.device)]
    return value
