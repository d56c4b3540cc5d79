"""The acceptance bar: the targets a recipe must meet on every held-out subject and training seed.

Kept apart from the sweep (experiments.py) so that the demo and checkpoint selection can report
against it without importing the sweep, which itself builds on the demo's recipes.
"""

from __future__ import annotations

# A recipe has to meet these on every (subject, training seed), with no per-subject tuning. One
# seed says little: re-contextualisation collapses in some seeds and not others, so the tables
# report the worst case beside the mean.
TARGETS = {"subject_fidelity": 0.9, "prompt_fidelity": 0.8, "class_drift": 0.1, "following_drop": 0.05}


def meets(m: dict, base: dict) -> list[str]:
    """The targets metrics `m` misses (empty: it meets the bar), against the base's prompt following."""
    missed = []
    if m["subject_fidelity"] < TARGETS["subject_fidelity"]:
        missed.append("subject")
    if m["prompt_fidelity"] < TARGETS["prompt_fidelity"]:
        missed.append("prompt")
    if m["class_drift"] > TARGETS["class_drift"]:
        missed.append("drift")
    if m["prompt_following"]["all"] < base["prompt_following"]["all"] - TARGETS["following_drop"]:
        missed.append("following")
    return missed


def bar_line(m: dict, base: dict) -> str:
    """One line for the demo: the model's bar metrics against the targets, prompt following against the base's."""
    floor = base["prompt_following"]["all"] - TARGETS["following_drop"]
    missed = meets(m, base)
    return (f"acceptance bar: subject fidelity {m['subject_fidelity']:.2f} (>= {TARGETS['subject_fidelity']}), prompt fidelity "
            f"{m['prompt_fidelity']:.2f} (>= {TARGETS['prompt_fidelity']}), class drift {m['class_drift']:.2f} "
            f"(<= {TARGETS['class_drift']}), prompt following {m['prompt_following']['all']:.2f} against the base's "
            f"{base['prompt_following']['all']:.2f} (>= {floor:.2f}): " + (f"misses {', '.join(missed)}" if missed else "meets every target"))
