"""A cheap, model-agnostic drift signal: the denoising loss on a fixed probe, against the base's.

The probe is a fixed set of (clean image, prompt, noise, timestep) triples, built once at the start
of a run from its own seeded generator: its timesteps are spread evenly over the noise levels of the
model's schedule (`NoiseSchedule.probe_t`), its noise and latent samples never come from the
training generators, and the modules are in eval mode while it runs (no dropout draws), so turning
it on leaves training bit for bit unchanged.

Two probes, each measured as the mean `objective.denoising_loss` over its triples:

- class probe: class images under their class prompt. These are the base's own samples of the
  class prompt, so the base's loss on them is its in-distribution loss, and a rise means the model
  has forgotten what the class looks like - the language drift prior preservation fights (Ruiz et
  al. 2022, section 3.3). With prior preservation the run's class images serve. Without it the
  base generates `probe_size` images per concept once (OUTPUT/monitor/class_images, the prior
  settings' sampler; reused on resume) for the class prompt, read as the instance prompt without
  its identifier ("a photo of sks dog" -> "a photo of dog"). We do not fall back to the instance
  photos: under the class prompt their loss *falls* as the class prompt takes on the subject and
  as the model fits those very images, so the signal would change sign with the data at hand.
- subject probe: the instance photos under their own prompts: how well the subject is learned.

    drift       = class_probe(model) - class_probe(base)        (0 at step 0)
    subject_fit = subject_probe(model) / subject_probe(base)    (1 at step 0; falls as the subject is learned)

What it is worth: it flags gross damage, but over the 12 miniature acceptance-bar runs it did not
rank models by the classifier's class drift (docs/experiments/drift-probe.md).

The base's losses are measured once, on the weights as loaded, before a resume loads a checkpoint
(full fine-tuning and freshly initialised LoRA adapters are then exactly the base), so no second
copy of the model is kept. Everything model-specific goes through the family seam
(`encode_images`, `latents_from`, `encode_prompt`, `conditioning`, `predict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import objective
from .config import ConceptConfig, MonitorConfig, TrainConfig
from .data.dataset import Batch, DreamBoothData, Example
from .data.images import load_images, to_tensor
from .models.family import Components, module_device


@dataclass
class Probe:
    """Fixed triples; item i is a batch of one (buckets may give items different sizes)."""

    prompts: list[str]
    x0: list[torch.Tensor]  # (1, C, h, w) clean latents
    noise: list[torch.Tensor]  # (1, C, h, w)
    timesteps: list[torch.Tensor]  # (1,)
    batches: list[Batch]  # each item's geometry, for conditioning (SDXL's size and crop ids)
    seeds: list[int]  # per-item seed for noise the conditioning itself draws (IF stage II)


def build_probe(comps: Components, examples: list[Example], sizes: list[tuple[int, int]], kind: str, size: int,
                seed: int) -> Probe:
    """`size` triples over `examples` (each with its prompt, at its (height, width)), evenly spaced through them."""
    generator = torch.Generator().manual_seed(seed)  # the probe's own stream
    device = module_device(comps.denoiser)
    steps = comps.schedule.probe_t(size)  # (size,) spread evenly over the noise levels
    probe = Probe([], [], [], [], [], [])
    for i in range(size):
        index = i * len(examples) // size if size <= len(examples) else i % len(examples)
        image = to_tensor(examples[index].image, sizes[index], center_crop=True)  # no augmentation draw
        with torch.no_grad():
            mean, std = comps.family.encode_images(comps, image.pixels[None].to(device))
        x0 = comps.family.latents_from(comps, mean.float(), std.float(), generator)  # (1, C, h, w)
        probe.prompts.append(examples[index].prompt)
        probe.x0.append(x0)
        probe.noise.append(objective.sample_noise(x0.shape, generator).to(device))
        probe.timesteps.append(steps[i : i + 1].to(device))
        probe.batches.append(Batch([examples[index]], torch.tensor([kind == "class"]), None, [(kind, index)],
                                   [image.original_size], [image.crop_top_left], tuple(image.pixels.shape[1:])))
        probe.seeds.append(seed * 1_000_003 + i)
    return probe


@torch.no_grad()
def probe_loss(comps: Components, probe: Probe, texts: dict[str, dict[str, torch.Tensor]] | None = None) -> float:
    """Mean denoising loss of the current modules over the probe, in eval mode (no dropout, no RNG use).

    `texts`: prompt -> encode_prompt output, when the text encoders do not train (else encoded here)."""
    modes = [(m, m.training) for m in comps.modules.values()]
    for m, _ in modes:
        m.eval()
    try:
        losses = []
        for i, prompt in enumerate(probe.prompts):
            text = texts[prompt] if texts is not None else comps.family.encode_prompt(comps, [prompt])
            x0 = probe.x0[i]
            text = {k: v.to(x0.device) for k, v in text.items()}
            cond = comps.family.conditioning(comps, text, probe.batches[i], x0, torch.Generator().manual_seed(probe.seeds[i]))
            per_sample = objective.denoising_loss(lambda noisy, t: comps.family.predict(comps, noisy, t, cond),
                                                  comps.schedule, x0, probe.noise[i], probe.timesteps[i])
            losses.append(per_sample.item())
    finally:
        for m, training in modes:
            m.train(training)
    return sum(losses) / len(losses)


def probe_class_images(cfg: TrainConfig, concepts: list[ConceptConfig], model_dir: Path, device, dtype) -> list[Example]:
    """Without prior preservation: `monitor.probe_size` base samples per concept of its class prompt (see above)."""
    from .data.class_images import ensure_class_images
    from .data.prior import class_image_settings

    examples = []
    for i, concept in enumerate(concepts):
        prompt = " ".join(w for w in concept.instance_prompt.split() if w != concept.resolved_identifier)
        settings = dataclasses.replace(class_image_settings(cfg, concept), prompt=prompt, num_images=cfg.monitor.probe_size)
        files = ensure_class_images(model_dir, Path(cfg.train.output_dir) / "monitor" / "class_images" / str(i), settings,
                                    device=device, dtype=dtype)
        examples += [Example(p, prompt, image) for p, image in zip(files, load_images(files, cfg.data.min_image_size))]
    return examples


class DriftMonitor:
    """The class and subject probes of one run, with the base's losses measured at construction."""

    def __init__(self, comps: Components, data: DreamBoothData, cfg: MonitorConfig, probe_images: list[Example],
                 text_encoders_train: bool):
        """`probe_images`: the class probe's images, when not the run's class images (`probe_class_images`)."""
        self.comps, self.cfg = comps, cfg
        if data.klass and not probe_images:  # (prior.source=model's class examples are the subject photos)
            self.class_probe = build_probe(comps, data.klass, data.sizes["class"], "class", cfg.probe_size, cfg.seed)
        else:
            self.class_probe = build_probe(comps, probe_images, [data.size] * len(probe_images), "class",
                                           cfg.probe_size, cfg.seed)
        self.subject_probe = build_probe(comps, data.subject, data.sizes["subject"], "subject", cfg.probe_size,
                                         cfg.seed + 1)
        self.texts = None
        if not text_encoders_train:  # frozen encoders: encode once (and before any offload to the CPU)
            with torch.no_grad():
                self.texts = {p: comps.family.encode_prompt(comps, [p])
                              for p in set(self.class_probe.prompts) | set(self.subject_probe.prompts)}
        self.base = self._losses()  # the weights as loaded: the base model

    def _losses(self) -> dict[str, float]:
        return {"class": probe_loss(self.comps, self.class_probe, self.texts),
                "subject": probe_loss(self.comps, self.subject_probe, self.texts)}

    def measure(self) -> dict[str, float]:
        """The current model's metrics: drift, subject_fit and the raw probe losses (for metrics.jsonl)."""
        now = self._losses()
        return {"drift": now["class"] - self.base["class"], "subject_fit": now["subject"] / self.base["subject"],
                "probe_class_loss": now["class"], "probe_subject_loss": now["subject"]}

    def base_metrics(self) -> dict[str, float]:
        """Step 0's line: the base against itself (drift 0, subject_fit 1) and its probe losses."""
        return {"drift": 0.0, "subject_fit": 1.0, "probe_class_loss": self.base["class"],
                "probe_subject_loss": self.base["subject"]}


def score(metrics: dict[str, float], fit_ratio: float) -> float | None:
    """train.select=best's score of a checkpoint (lower is better): its drift, once subject_fit <= fit_ratio; else None."""
    return metrics["drift"] if metrics["subject_fit"] <= fit_ratio else None
