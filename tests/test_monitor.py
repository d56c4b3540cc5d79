"""The drift probe (monitor.py) and train.select=best: fixed probe, zero at step 0, logged, grows
when the class is damaged, exact resume with it on, and the best checkpoint exported bit for bit."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.config import build_config
from dreambooth.data.dataset import DreamBoothData, subject_examples
from dreambooth.errors import DreamBoothError
from dreambooth.models.load import load_components
from dreambooth.monitor import DriftMonitor
from dreambooth.train import train

from test_train import _final_weights, make_cfg, straight_and_resumed

MONITOR = {"every_n_steps": 1, "probe_size": 3}


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_timesteps_spread_over_the_schedule(tiny_sd_dir):
    schedule = load_components(tiny_sd_dir).schedule  # the probe's timesteps come from the model's own schedule
    assert schedule.probe_t(4).tolist() == [125, 375, 625, 875]


def test_probe_is_fixed_and_the_base_has_no_drift(tiny_sd_dir, photos, tmp_path):
    """Two monitors built from the same settings hold the same probe; measuring twice gives the same
    losses; on the untouched base the drift is exactly 0 and subject_fit exactly 1."""
    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "out", prior={"enabled": False}, concept={"class_prompt": None},
                   monitor=MONITOR)
    comps = load_components(tiny_sd_dir)
    data = DreamBoothData(subject_examples(cfg.resolved_concepts(), cfg.data), [], cfg.data, 0)
    probe_images = subject_examples(cfg.resolved_concepts(), cfg.data)[:2]  # any fixed images will do here
    a = DriftMonitor(comps, data, cfg.monitor, probe_images, text_encoders_train=False)
    b = DriftMonitor(comps, data, cfg.monitor, probe_images, text_encoders_train=True)
    for pa, pb in ((a.class_probe, b.class_probe), (a.subject_probe, b.subject_probe)):
        assert pa.prompts == pb.prompts
        for ta, tb in zip(pa.x0 + pa.noise + pa.timesteps, pb.x0 + pb.noise + pb.timesteps):
            assert torch.equal(ta, tb)
    assert a.base == b.base  # cached and freshly encoded prompts agree
    assert a.measure() == a.measure()
    first = a.measure()
    assert first["drift"] == 0.0 and first["subject_fit"] == 1.0
    assert a.class_probe.prompts[0] == "a photo of sks dog"  # (these probe images carry the instance prompt)


def test_drift_is_logged_and_probe_images_are_made_without_prior(tiny_sd_dir, photos, tmp_path):
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, prior={"enabled": False}, concept={"class_prompt": None},
                   monitor={"every_n_steps": 2, "probe_size": 2}, train={"max_steps": 4}))
    lines = [m for m in _metrics(out) if "drift" in m]
    assert [m["step"] for m in lines] == [0, 2, 4]
    assert lines[0]["drift"] == 0.0 and lines[0]["subject_fit"] == 1.0
    assert all(m["drift"] != 0.0 for m in lines[1:])
    assert set(lines[1]) == {"step", "drift", "subject_fit", "probe_class_loss", "probe_subject_loss"}
    # the base drew two probe images for "a photo of dog" (the instance prompt without its identifier)
    manifest = (out / "monitor" / "class_images" / "0" / "manifest.jsonl").read_text()
    assert len(sorted((out / "monitor" / "class_images" / "0").glob("*.png"))) == 2 and "a photo of dog" in manifest


def test_drift_grows_without_prior_preservation_at_a_high_lr(tmp_path):
    """On the miniature world's pretrained base (a random tiny model improves on everything it is shown),
    10 steps on the subject alone at 10x the demo's rate make the model denoise the base's own "a photo
    of a toy" images far worse (measured: drift +0.12 on a base probe loss of 0.05); at 1e-5 the same
    10 steps leave it where it was (-0.001)."""
    from dreambooth.miniworld import world
    from dreambooth.miniworld.demo import PAPER_SETTINGS, demo_config

    def drift_after(lr, folder):
        world.write_instance_images("banded_heart", folder / "instance_images")
        train(demo_config(folder, overrides={"prior.enabled": False, "optim.lr": lr, "train.max_steps": 10,
                                             "monitor.every_n_steps": 5, "monitor.probe_size": 4,
                                             "prior.num_inference_steps": 10, "export.verify": False}, recipe=PAPER_SETTINGS))
        lines = [m for m in _metrics(folder / "model") if "drift" in m]
        assert [m["step"] for m in lines] == [0, 5, 10] and lines[0]["drift"] == 0.0
        return lines

    high, low = drift_after(1e-3, tmp_path / "high"), drift_after(1e-5, tmp_path / "low")
    base_loss = high[0]["probe_class_loss"]
    assert low[0]["probe_class_loss"] == base_loss  # the same probe, the same base
    for h, lo in zip(high[1:], low[1:]):
        assert h["drift"] > base_loss / 2 and h["drift"] > 10 * abs(lo["drift"]), (h, lo)


def test_resume_is_exact_with_the_monitor_on(tiny_sd_dir, photos, tmp_path, monkeypatch):
    """The probe draws nothing from the training generators: a crashed and resumed run equals a straight
    one, losses, weights and logged drift alike (the resumed run re-measures the base itself)."""
    settings = dict(train={"max_steps": 4, "select": "best"}, checkpoint={"every_n_steps": 2},
                    monitor={**MONITOR, "fit_ratio": 1.0}, lora={"dropout": 0.1}, data={"random_flip": True})
    straight, resumed = straight_and_resumed(tiny_sd_dir, photos, tmp_path, monkeypatch, settings, crash_at=2)
    assert straight.losses == {**straight.losses, **resumed.losses}
    a, b = _final_weights(tmp_path / "a", "full"), _final_weights(tmp_path / "b", "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drift_a = {m["step"]: m["drift"] for m in _metrics(tmp_path / "a") if "drift" in m}
    drift_b = {m["step"]: m["drift"] for m in _metrics(tmp_path / "b") if "drift" in m}
    assert drift_a == drift_b and sorted(drift_a) == [0, 1, 2, 3, 4]


def test_monitor_does_not_change_training(tiny_sd_dir, photos, tmp_path):
    off = train(make_cfg(tiny_sd_dir, photos, tmp_path / "off"))
    on = train(make_cfg(tiny_sd_dir, photos, tmp_path / "on", monitor=MONITOR))
    assert off.losses == on.losses


def test_select_best_exports_the_best_checkpoint_bitwise(tmp_path):
    """Every other step checkpointed and probed (keep=1, so rotation must spare the best one); the export
    holds exactly the weights of the checkpoint with the lowest drift among those that fit the subject.
    On (a copy of) the miniature base at 3x the demo's rate without prior preservation drift rises as
    the subject is learned, so the best is an early checkpoint, not the last. A copy: outside the
    bundled folder the run is not "in the miniature world", so the probe scores, not the classifier."""
    from dreambooth.miniworld import world
    from dreambooth.miniworld.demo import PAPER_SETTINGS, demo_config
    from dreambooth.miniworld.evaluate import DEFAULT_BASE

    base = shutil.copytree(DEFAULT_BASE, tmp_path / "base", symlinks=True)
    world.write_instance_images("banded_heart", tmp_path / "instance_images")
    result = train(demo_config(tmp_path, base_dir=base, overrides={
        "prior.enabled": False, "optim.lr": 3e-4, "train.max_steps": 10, "train.select": "best",
        "checkpoint.every_n_steps": 2, "checkpoint.keep": 1, "monitor.every_n_steps": 2, "monitor.probe_size": 4,
        "monitor.fit_ratio": 0.9, "prior.num_inference_steps": 10, "export.verify": False}, recipe=PAPER_SETTINGS))
    out = tmp_path / "model"
    lines = {m["step"]: m for m in _metrics(out) if "drift" in m and m["step"] > 0}
    candidates = {s: m["drift"] for s, m in lines.items() if m["subject_fit"] <= 0.9}
    chosen = min(candidates, key=candidates.get)
    assert chosen < 10 and result.exported_step == chosen and ckpt.best_checkpoint(out).name == f"step-{chosen:06d}"
    assert sorted(p.name for p in ckpt.checkpoints_root(out).glob("step-*")) == [f"step-{chosen:06d}", "step-000010"]
    saved = load_file(ckpt.best_checkpoint(out) / "trainable.safetensors")
    exported = _final_weights(out, "full")
    assert {k.replace("te.", "text_encoder.", 1) for k in exported} == set(saved)
    assert all(torch.equal(exported[k], saved[k.replace("te.", "text_encoder.", 1)]) for k in exported)
    last = load_file(ckpt.checkpoints_root(out) / "step-000010" / "trainable.safetensors")
    assert not all(torch.equal(last[k], saved[k]) for k in saved)  # the choice mattered
    state = json.loads((ckpt.best_checkpoint(out) / "state.json").read_text())
    assert state["metrics"]["drift"] == lines[chosen]["drift"]


@pytest.mark.slow
def test_select_best_in_the_miniature_world_scores_with_the_classifier(tmp_path):
    """With the miniature world's judge (the bundled base, a held-out subject's photos), each checkpoint is rendered
    and scored against the acceptance bar (targets missed + shortfall); the lowest score is exported."""
    from dreambooth.miniworld import world
    from dreambooth.miniworld.demo import PAPER_SETTINGS, demo_config

    from dreambooth.miniworld.selection import judge_for

    world.write_instance_images("banded_heart", tmp_path / "instance_images")
    cfg = demo_config(tmp_path, overrides={
        "prior.enabled": False, "optim.lr": 3e-4, "train.max_steps": 10, "train.select": "best",
        "checkpoint.every_n_steps": 5, "checkpoint.keep": 5, "monitor.every_n_steps": 5, "monitor.probe_size": 2,
        "prior.num_inference_steps": 10, "export.verify": False}, recipe=PAPER_SETTINGS)
    assert judge_for(cfg) is not None
    result = train(cfg, judge=judge_for(cfg))  # the miniature world passes its judge; the trainer never looks for it
    out = tmp_path / "model"
    states = {int(p.name[5:]): json.loads((p / "state.json").read_text())["metrics"]
              for p in ckpt.checkpoints_root(out).glob("step-*")}
    assert sorted(states) == [5, 10]
    for m in states.values():
        c = m["classifier"]
        assert set(c) == {"missed", "subject_fidelity", "prompt_fidelity", "class_drift", "prompt_following"}
        assert len(c["missed"]) <= m["score"] < len(c["missed"]) + 1
    chosen = min(states, key=lambda s: states[s]["score"])
    assert result.exported_step == chosen and ckpt.best_checkpoint(out).name == f"step-{chosen:06d}"
    saved = load_file(ckpt.best_checkpoint(out) / "trainable.safetensors")
    exported = _final_weights(out, "full")
    assert all(torch.equal(exported[k], saved[k.replace("te.", "text_encoder.", 1)]) for k in exported)


def test_select_best_without_probe_or_checkpoints_is_refused(tiny_sd_dir, photos, tmp_path):
    with pytest.raises(DreamBoothError, match="train.select=best .*checkpoint.every_n_steps"):
        make_cfg(tiny_sd_dir, photos, tmp_path, train={"select": "best"}, checkpoint={"every_n_steps": 2}).validate()
    with pytest.raises(DreamBoothError, match="monitor.probe_size"):
        build_config({"model": {"path": "x"}, "concept": {"instance_dir": "x", "instance_prompt": "a sks dog"},
                      "monitor": {"probe_size": 0}}).validate()
