"""The experiments sweep's machinery: resumed step chains, cached results, tables, the docs/experiments blocks, roughness."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth.errors import DreamBoothError
from dreambooth.miniworld import bar, experiments, world
from dreambooth.miniworld.evaluate import roughness



def test_roughness_separates_clean_renders_from_noise():
    clean = torch.from_numpy(np.stack([world.to_array(im) for im in world.instance_images("banded_heart", 4)]))
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    flat = torch.zeros_like(clean)
    r_clean, r_noisy, r_flat = roughness(clean), roughness(noisy), roughness(flat)
    assert r_flat.eq(0).all()
    assert (r_clean > 0).all() and (r_noisy > r_clean + 0.05).all(), (r_clean, r_noisy)


@pytest.mark.slow
def test_run_chain_resumes_and_caches(tmp_path, monkeypatch):
    run = experiments.Run("tiny", {"prior.enabled": False}, (1, 2), samplers=(experiments.DEFAULT_SAMPLER, ("pndm", 5)))
    results = experiments.run_one(run, tmp_path, n=1, verbose=False)
    assert sorted(results) == ["1|ddim|25", "2|ddim|25", "2|pndm|5"]
    # one checkpoint kept, at the last step; the chain resumed instead of starting over
    ckpts = sorted(p.name for p in (tmp_path / "tiny" / "model" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000002"]
    assert json.loads((tmp_path / "tiny" / "results.json").read_text()) == results
    for m in results.values():
        assert 0 <= m["subject_fidelity"] <= 1 and m["roughness"] > 0 and m["train_seconds"] >= 0

    # a second call finds everything measured and trains nothing
    import dreambooth.train

    monkeypatch.setattr(dreambooth.train, "train", lambda cfg: pytest.fail("retrained a measured run"))
    assert experiments.run_one(run, tmp_path, n=1, verbose=False) == results


def test_render_and_tables_block(tmp_path):
    m = {"subject_fidelity": 0.5, "prompt_fidelity": 0.25, "class_drift": 0.125, "roughness": 0.0312,
         "class_diversity": {"shape": 0.9, "colour": 0.8, "distinct_pairs": 9}, "prompt_following": {"all": 0.75}}
    results = {"lr-1e-4": {"800|ddim|25": m}, "base": {"0|ddim|25": {k: m[k] for k in ("class_diversity", "prompt_following", "roughness")}}}
    tables = experiments.render(results, n=4)
    assert "| 1e-4 | 800 | 0.50 | 0.25 | 0.12 | 0.90 / 0.80 | 0.75 | 0.031 |" in tables
    assert "| 3e-5 | 200 | (not run) |" in tables
    assert "| base model |  | - | - | - | 0.90 / 0.80 | 0.75 | 0.031 |" in tables
    assert "| banded_heart | heart, hbands | blue, green | 0.50 |" in tables  # the main subject's row reuses the lr 1e-4 run

    page = tmp_path / "sweeps.md"
    bar_block = f"{experiments.BAR_BEGIN}\nbar tables\n{experiments.BAR_END}"
    page.write_text(f"intro\n{experiments.BEGIN}\nold\n{experiments.END}\nbetween\n{bar_block}\noutro\n")
    experiments.update_tables(page, tables)
    experiments.update_tables(page, tables)  # idempotent
    text = page.read_text()
    assert text == f"intro\n{experiments.BEGIN}\n{tables}\n{experiments.END}\nbetween\n{bar_block}\noutro\n"
    experiments.update_tables(page, "new bar", (experiments.BAR_BEGIN, experiments.BAR_END))  # the other block only
    assert page.read_text() == text.replace("bar tables", "new bar")

    for bad in ("no markers\n", f"{experiments.END}\n{experiments.BEGIN}\n",
                f"{experiments.BEGIN}\n{experiments.END}\n{experiments.BEGIN}\n{experiments.END}\n"):
        plain = tmp_path / "plain.md"
        plain.write_text(bad)
        with pytest.raises(ValueError, match="needs one .* block"):
            experiments.update_tables(plain, tables)
        assert plain.read_text() == bad  # refused before anything is written


def test_experiments_pages_hold_their_generated_blocks():
    """The pages the script rewrites by default exist in the repository with one block each, so a rerun of the
    sweep or the bar lands in the lab notebook (and never in the README, which is a guide)."""
    root = Path(__file__).resolve().parents[1]
    for page, (begin, end), generated in (
            (experiments.SWEEP_PAGE, (experiments.BEGIN, experiments.END), "**Learning rate x steps**"),
            (experiments.BAR_PAGE, (experiments.BAR_BEGIN, experiments.BAR_END), "| candidate | runs that meet |")):
        text = (root / page).read_text()
        assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), page
        assert generated in text.split(begin)[1].split(end)[0], page  # the block holds what the script renders
    readme = (root / "README.md").read_text()
    assert not any(m in readme for m in (experiments.BEGIN, experiments.END, experiments.BAR_BEGIN, experiments.BAR_END))


def test_sweep_names_every_run_the_tables_use():
    keys = {r.key for r in experiments.runs()}
    assert {"lr-3e-5", "lr-1e-4", "lr-3e-4", "no-prior", "frozen-te", "overfit", "overfit-onset"} <= keys
    assert {f"subject-{s}" for s in world.SUBJECTS if s != experiments.SUBJECT} <= keys


def test_aspect_ratio_runs_and_their_table():
    """The mixed-aspect photos (one square, four 64x32 / 32x64 frames) and the table's per-seed and mean rows."""
    sizes = [im.size for im in world.mixed_aspect_images("banded_heart")]
    assert sizes == [(32, 32), (64, 32), (64, 32), (32, 64), (32, 64)]
    keys = {r.key for r in experiments.runs()}
    assert {f"aspect-{m}-seed{s}" for m in ("crop", "buckets") for s in experiments.ASPECT_SEEDS} <= keys

    def metrics(x):
        return {"subject_fidelity": x, "prompt_fidelity": x / 2, "class_drift": 0.0, "roughness": 0.02,
                "class_diversity": {"shape": 1.0, "colour": x}, "prompt_following": {"all": 0.5}}

    results = {f"aspect-buckets-seed{s}": {"800|ddim|25": metrics(v)} for s, v in zip(experiments.ASPECT_SEEDS, (0.2, 0.4, 0.6))}
    tables = experiments.render(results, n=4)
    assert "| mixed | buckets | 800 | 1 | 0.40 | 0.20 | 0.00 | 1.00 / 0.40 | 0.50 | 0.020 |" in tables
    assert "| mixed | buckets | 800 | mean | 0.40 | 0.20 | 0.00 | 1.00 / 0.40 | 0.50 | 0.020 |" in tables
    assert "| mixed | square centre crop | 800 | mean | (not run) |" in tables


def test_bar_runs_meets_and_worst_case_table():
    """The acceptance bar: a run per (subject, seed), the targets each run misses, the mean and the worst case."""
    runs = experiments.bar_runs("paper")
    assert len(runs) == len(world.SUBJECTS) * len(experiments.BAR_SEEDS)
    assert {(r.subject, r.overrides["train.seed"]) for r in runs} == {(s, k) for s in world.SUBJECTS for k in experiments.BAR_SEEDS}
    assert len({r.key for r in runs}) == len(runs) and all(r.steps == (experiments.BAR_STEPS,) for r in runs)
    with pytest.raises(ValueError, match="unknown bar candidate 'nope'"):
        experiments.bar_runs("nope")

    base = {"prompt_following": {"all": 0.99}, "class_diversity": {"shape": 1.0, "colour": 1.0}, "roughness": 0.02}

    def metrics(subject, prompt, drift, following):
        return {"subject_fidelity": subject, "prompt_fidelity": prompt, "class_drift": drift, "roughness": 0.02,
                "class_diversity": {"shape": 1.0, "colour": 1.0}, "prompt_following": {"all": following}}

    good = metrics(0.95, 0.85, 0.05, 0.95)
    assert bar.meets(good, base) == []
    assert bar.bar_line(good, base).endswith("following 0.95 against the base's 0.99 (>= 0.94): meets every target")
    assert bar.bar_line(metrics(0.5, 0.85, 0.05, 0.9), base).endswith("misses subject, following")
    assert bar.meets(metrics(0.89, 0.85, 0.11, 0.93), base) == ["subject", "drift", "following"]
    results = {"base": {"0|ddim|25": base}, **{r.key: {"800|ddim|25": good} for r in runs}}
    results[runs[0].key]["800|ddim|25"] = metrics(0.5, 0.25, 0.5, 0.5)
    table = experiments.render_bar(results, ["paper"])
    assert f"| {runs[0].subject} | 0 | subject, prompt, drift, following | 0.50 | 0.25 | 0.50 |" in table
    assert f"| {runs[1].subject} | 1 | meets | 0.95 |" in table
    assert f"| mean |  | {len(runs) - 1}/{len(runs)} meet |" in table
    assert "| worst |  |  | 0.50 | 0.25 | 0.50 | 1.00 / 1.00 | 0.50 |" in table
    del results[runs[3].key]  # an incomplete candidate has no mean or worst row
    assert "| worst |  |  | (not run) |" in experiments.render_bar(results, ["paper"])


def asked_prompts() -> set[str]:
    from dreambooth.miniworld.evaluate import EvalSettings, attribute_combinations

    return {world.describe(*c) for c in attribute_combinations(EvalSettings().attribute_prompts, EvalSettings().seed)}


def test_every_bar_candidate_builds_a_valid_config(tmp_path):
    """Each candidate's settings pass the trainer's checks (prior.source=model gets no class folder), and the
    knowledge-preservation prompts leave out every prompt the prompt-following measurement asks for."""
    from dreambooth.miniworld.demo import PAPER_SETTINGS, demo_config
    from dreambooth.miniworld.evaluate import EvalSettings, attribute_combinations

    for name in experiments.BAR_CANDIDATES:
        run = experiments.bar_runs(name, seeds=(0,), subjects=("banded_heart",))[0]  # (the world's own keys taken out)
        cfg = demo_config(tmp_path / name, overrides=run.overrides, recipe=PAPER_SETTINGS).validate()
        assert (cfg.concept.class_dir is None) == (cfg.prior.source == "model"), name
        assert run.captions == name.endswith("+captions"), name
    assert not asked_prompts() & set(experiments.class_attribute_prompts())  # caption-diverse class prompts: held out too
    asked = {world.describe(*c) for c in attribute_combinations(EvalSettings().attribute_prompts, EvalSettings().seed)}
    prompts = experiments.preserve_prompts()
    assert len(prompts) == len(world.world_combinations()) - len(asked) and not asked & set(prompts)
    table = experiments.render_bar({"base": {"0|ddim|25": {"prompt_following": {"all": 1.0}}}}, ["model-prior+kp"])
    assert f"prior.preserve_prompts=[{len(prompts)} prompts]" in table


def test_the_demo_default_is_the_measured_candidate(tmp_path):
    """The demo trains what the bar measured: the paper's recipe plus the default candidate's changes, and with
    --lora the LoRA candidate's (whose text side is the earlier default's: LORA_CHANGES undoes the pivot)."""
    from dataclasses import asdict

    from dreambooth.miniworld import demo

    assert experiments.BAR_CANDIDATES[experiments.DEFAULT_CANDIDATE] == demo.DEFAULT_CHANGES
    assert demo.DEMO_SETTINGS == {**demo.PAPER_SETTINGS, **demo.DEFAULT_CHANGES}

    def trained(overrides, recipe=None):
        return asdict(demo.demo_config(tmp_path, overrides=overrides, recipe=recipe).validate())

    lora = experiments.BAR_CANDIDATES[experiments.LORA_CANDIDATE]
    assert trained(demo.family_overrides(lora=True)) == trained(lora, recipe=demo.PAPER_SETTINGS)
    assert trained({}) != trained(lora, recipe=demo.PAPER_SETTINGS)
    assert demo.family_overrides("sd", lora=True) == demo.LORA_CHANGES
    with pytest.raises(DreamBoothError, match="sd base only"):  # SDXL cannot load the identifier beside a LoRA
        demo.family_overrides("sdxl", lora=True)
    cfg = demo.demo_config(tmp_path, overrides=demo.NO_PRIOR).validate()  # `dreambooth demo --no-prior`
    assert not cfg.prior.enabled and not cfg.prior.distills and cfg.text_encoder.scope == "identifier"


def test_checkpoint_selection_is_scored_apart_from_the_evaluation():
    """train.select=best never sees the images or attribute prompts the evaluation grades, and the knowledge-
    preservation prompts of a selecting candidate leave out the selection's prompts as well as the evaluation's."""
    from dreambooth.miniworld.demo import preserve_prompts
    from dreambooth.miniworld.evaluate import SELECTION_SETTINGS, EvalSettings, attribute_combinations
    from dreambooth.miniworld.selection import SETTINGS

    ev, sel = EvalSettings(), SELECTION_SETTINGS
    assert SETTINGS == sel
    assert set(range(sel.seed, sel.seed + sel.n)).isdisjoint(range(ev.seed, ev.seed + ev.n))
    asked = {world.describe(*c) for c in attribute_combinations(ev.attribute_prompts, ev.seed)}
    scored = {world.describe(*c) for c in attribute_combinations(sel.attribute_prompts, sel.seed)}
    assert scored.isdisjoint(asked) and len(scored) == sel.attribute_prompts
    kept = set(preserve_prompts(leave_out_selection=True))
    assert kept.isdisjoint(asked | scored) and len(kept) == len(world.world_combinations()) - len(asked | scored)
