"""train.select=best in the miniature world: score each checkpoint with the attribute classifier.

When a run trains one of the bundled miniature bases on a held-out subject's photos (as
`world.write_instance_images` names them, `<subject>_NN.png`) and the classifier is installed, the
drift probe is not the best judge we have: `evaluate.measure` is. Each checkpoint is then rendered
with a small `n` (8 images per prompt, one per attribute prompt: a few seconds at 32 px; seeds and
attribute prompts apart from the evaluation's, `evaluate.SELECTION_SETTINGS`) and scored against the
acceptance bar's targets (`bar.TARGETS`). The miniature world passes it to the trainer
(`train(cfg, judge=judge_for(cfg))`); the trainer never looks for it:

    score = number of targets missed + 0.99 * mean shortfall over the four targets (0..1)

so a checkpoint that meets more targets always wins, and among equals the one closest to meeting
them. The base is measured once at the start with the same settings (its prompt following is the
reference). Rendering uses its own seeds and the torch RNG is restored afterwards, so training is
unchanged. Without a judge, the drift probe scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..data.images import list_images
from . import world
from .evaluate import BASES, DEFAULT_CLASSIFIER, SELECTION_SETTINGS, EvalSettings, measure
from .bar import TARGETS, meets

SETTINGS = SELECTION_SETTINGS


def subject_of(instance_dir: str | Path) -> Optional[str]:
    """The held-out subject whose photos fill `instance_dir` (`<subject>_NN.png`), or None."""
    names = {p.stem.rsplit("_", 1)[0] for p in list_images(instance_dir)}
    return names.pop() if len(names) == 1 and next(iter(names)) in world.SUBJECTS else None


def shortfall(m: dict, base: dict) -> float:
    """Mean distance (0..1) by which `m` misses the four targets; 0 when it meets them all."""
    gaps = [max(0.0, TARGETS["subject_fidelity"] - m["subject_fidelity"]),
            max(0.0, TARGETS["prompt_fidelity"] - m["prompt_fidelity"]),
            max(0.0, m["class_drift"] - TARGETS["class_drift"]),
            max(0.0, base["prompt_following"]["all"] - TARGETS["following_drop"] - m["prompt_following"]["all"])]
    return sum(gaps) / len(gaps)


class ClassifierScore:
    """Called with the training components at a checkpoint: (score, metrics); lower scores are better."""

    def __init__(self, comps, subject: str, settings: EvalSettings = SETTINGS):
        from .classifier import load_classifier

        self.subject, self.settings = subject, settings
        self.classifier = load_classifier(DEFAULT_CLASSIFIER)
        self.base = self.measure(comps)  # called before any update: the base

    def measure(self, comps) -> dict:
        from ..sampling import make_scheduler

        modes = [(m, m.training) for m in comps.modules.values()]
        with torch.random.fork_rng(devices=[]):  # the pipeline draws from its own seeded generators; be sure
            for m, _ in modes:
                m.eval()
            pipe = comps.family.pipeline(comps, scheduler=make_scheduler(self.settings.scheduler, comps.inference_scheduler.config))
            metrics = measure(pipe, self.classifier, self.subject, self.settings)
            for m, training in modes:
                m.train(training)
        return metrics

    def __call__(self, comps) -> tuple[float, dict]:
        m = self.measure(comps)
        missed = meets(m, self.base)
        return len(missed) + 0.99 * shortfall(m, self.base), {"missed": missed, **{k: m[k] for k in (
            "subject_fidelity", "prompt_fidelity", "class_drift")}, "prompt_following": m["prompt_following"]["all"]}


def judge_for(cfg):
    """`train(cfg, judge=...)`'s judge for a run of a bundled base on one held-out subject's photos, when the
    classifier is installed: called with the base's components, it returns their ClassifierScore. None otherwise."""
    concepts = cfg.resolved_concepts()
    bundled = Path(cfg.model.path).resolve() in {Path(b).resolve() for b in BASES.values()}
    if not bundled or len(concepts) != 1 or not (DEFAULT_CLASSIFIER / "config.json").is_file():
        return None
    subject = subject_of(concepts[0].instance_dir)
    return None if subject is None else (lambda comps: ClassifierScore(comps, subject))
