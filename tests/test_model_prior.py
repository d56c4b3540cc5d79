"""Distilled targets: prior.source=model and knowledge preservation (prior.preserve_prompts / preserve_weight).

The target of a distilled sample is the frozen base model's prediction at the sample's own noisy
input and timestep; it is checked here against a freshly loaded base model by hand, for a full
fine-tune (a frozen copy) and LoRA (the same modules with adapters off, no copy).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from dreambooth import objective
from dreambooth.config import LoRAConfig, ObjectiveConfig, TextEncoderConfig
from dreambooth.data.dataset import DreamBoothData, class_prompt_twins, subject_examples
from dreambooth.errors import DreamBoothError
from dreambooth.models.frozen_base import FrozenBase
from dreambooth.models.load import detect_family
from dreambooth.models.trainable import setup_trainable
from dreambooth.schedule import DDPMSchedule
from dreambooth.train import train

from test_train import make_cfg, straight_and_resumed

MODEL_PRIOR = {"enabled": True, "source": "model", "num_class_images": 3, "num_inference_steps": 2, "batch_size": 3}
PRESERVE = {"preserve_prompts": ["a photo of a red car", "a photo of a blue sky", "a cat"], "preserve_weight": 0.5}


def _load(model_dir):
    family = detect_family(model_dir)
    return family, family.load(model_dir)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _te_config(train_te: bool) -> dict[str, TextEncoderConfig]:
    return {"text_encoder": TextEncoderConfig(train=train_te)}


def _batch(comps, prompts):
    """A hand-made batch of two rows: latents (2, 4, 4, 4) and the tiny model's text for `prompts`."""
    class Rows:  # what the family's conditioning reads of a batch (SD: nothing) and the teacher (the prompts)
        def __init__(self, prompts):
            self.examples = [type("E", (), {"prompt": p})() for p in prompts]
    g = torch.Generator().manual_seed(3)
    return Rows(prompts), torch.randn(len(prompts), 4, 4, 4, generator=g)


# ---- the target is the frozen base model's prediction ------------------------------------

@pytest.mark.parametrize("method", ["full", "lora"])
def test_distilled_target_is_the_base_models_prediction(tiny_sd_dir, method):
    """Row 1 (distilled) has the base model's prediction as its target, row 0 the noise; the trained
    model's text encoder has changed, the base's conditioning has not; gradients reach only trained weights."""
    family, comps = _load(tiny_sd_dir)
    _, reference = _load(tiny_sd_dir)  # the untouched base, to check by hand
    te = _te_config(True)
    base = FrozenBase(comps, ["unet", "text_encoder"], lora=method == "lora")
    trainable = setup_trainable(comps, method, LoRAConfig(), te)
    for name in ("unet", "text_encoder"):
        _perturb(comps.modules[name], seed=len(name))  # the trained model now differs from the base (LoRA: B != 0)
    prompts = ["a photo of sks dog", "a photo of a dog"]
    base.encode_prompts(prompts)
    batch, x0 = _batch(comps, prompts)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    cond = family.conditioning(comps, family.encode_prompt(comps, prompts), batch, x0, g)
    distilled = torch.tensor([False, True])
    per_sample = objective.diffusion_loss(lambda x, t: family.predict(comps, x, t, cond), comps.schedule, x0,
                                          torch.Generator().manual_seed(5), ObjectiveConfig(),
                                          teacher=base.predictor(batch, x0, cond, state), distilled=distilled)

    # by hand: the same noise and timesteps, the base model's own text encoder and UNet
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    noisy = comps.schedule.scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        prediction = family.predict(comps, noisy, t, cond)
        base_text = family.encode_prompt(reference, prompts)
        base_prediction = family.predict(reference, noisy, t, base_text)
    expected = torch.stack([F.mse_loss(prediction[0], noise[0]), F.mse_loss(prediction[1], base_prediction[1])])
    torch.testing.assert_close(per_sample.detach(), expected, rtol=1e-5, atol=1e-6)
    assert per_sample[1] > 0  # the trained model really differs from the base

    per_sample.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.named().values())
    frozen = [p for m in base.copies().values() for p in m.parameters()] if method == "full" else \
        [p for n, p in comps.modules["unet"].named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_lora_base_is_the_same_model_with_adapters_off(tiny_sd_dir):
    """No second copy; after a teacher call the adapters are on again and a frozen adapter stays frozen."""
    family, comps = _load(tiny_sd_dir)
    _, reference = _load(tiny_sd_dir)
    base = FrozenBase(comps, ["unet", "text_encoder"], lora=True)
    trainable = setup_trainable(comps, "lora", LoRAConfig(), _te_config(True))
    assert base.copies() == {}
    assert all(base.comps.modules[name] is comps.modules[name] for name in comps.modules)
    _perturb(comps.modules["unet"], seed=1)
    trainable.freeze("text_encoder")  # as at a text encoder's stop_step
    batch, x0 = _batch(comps, ["a photo of a dog", "a photo of a dog"])
    cond = family.conditioning(comps, family.encode_prompt(comps, ["a photo of a dog"] * 2), batch, x0, None)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        before = family.predict(comps, x0, t, cond)
        teacher = base.predictor(batch, x0, cond, torch.Generator().get_state())(x0, t, torch.tensor([True, True]))
        after = family.predict(comps, x0, t, cond)
        by_hand = family.predict(reference, x0, t, cond)
    torch.testing.assert_close(teacher, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, by_hand, atol=1e-4)  # the adapters matter ...
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # ... and are back on
    assert not any(p.requires_grad for p in trainable.params["text_encoder"].values())
    assert all(p.requires_grad for p in trainable.params["unet"].values())


def test_full_fine_tune_copies_only_the_trained_modules(tiny_sd_dir):
    _, comps = _load(tiny_sd_dir)
    base = FrozenBase(comps, ["unet"], lora=False)
    assert set(base.copies()) == {"unet"} and base.copies()["unet"] is not comps.modules["unet"]
    assert base.comps.modules["vae"] is comps.modules["vae"] and base.comps.modules["text_encoder"] is comps.modules["text_encoder"]
    assert not any(p.requires_grad for p in base.copies()["unet"].parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_and_noise_invert_the_noising(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g), torch.tensor([0, 500, 999])
    noisy = sched.add_noise(x0, eps, t)
    prediction = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    got_x0, got_eps = DDPMSchedule(sched).x0_and_noise(noisy, t, prediction)
    torch.testing.assert_close(got_eps, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_x0[1:], x0[1:], rtol=1e-3, atol=1e-3)  # t = 0 divides by a_t ~ 1: exact too
    torch.testing.assert_close(got_x0[:1], x0[:1], rtol=1e-3, atol=1e-3)


def test_base_samples_are_ddim_steps_by_hand():
    """Two DDIM steps (t = 999, 499) with a teacher that predicts a fixed noise: x0 by hand, rows selected."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    fixed = torch.full((1, 4, 2, 2), 0.3)
    calls = []

    def teacher(x, t, rows):
        calls.append((x.shape[0], t.tolist(), rows.tolist()))
        return fixed.expand_as(x) + 0.1 * x  # depends on x, so the second step's input matters

    rows = torch.tensor([False, True, True])
    got = objective.base_samples(teacher, DDPMSchedule(sched), torch.Size((3, 4, 2, 2)), rows,
                                 torch.Generator().manual_seed(4), steps=2)
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    abar = sched.alphas_cumprod
    for i, t in enumerate((999, 499)):
        eps = 0.3 + 0.1 * x
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if i == 0:
            x = abar[499].sqrt() * x0 + (1 - abar[499]).sqrt() * eps
    torch.testing.assert_close(got, x0, rtol=1e-5, atol=1e-5)
    assert calls == [(2, [999, 999], [False, True, True]), (2, [499, 499], [False, True, True])]


# ---- weights and data ------------------------------------------------------------------

def test_combine_with_preservation_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    is_prior = torch.tensor([False, False, True, True, False, False])
    is_preserve = torch.tensor([False, False, False, False, True, True])
    got = objective.combine(losses, is_prior, 0.5, is_preserve, 0.25)
    assert got.item() == pytest.approx((1 + 2) / 2 + 0.5 * (3 + 4) / 2 + 0.25 * (5 + 6) / 2)
    assert objective.distilled_samples(is_prior, is_preserve, prior_from_model=False).tolist() == is_preserve.tolist()
    assert objective.distilled_samples(is_prior, None, prior_from_model=True).tolist() == is_prior.tolist()
    assert objective.distilled_samples(is_prior, None, prior_from_model=False) is None


def test_twins_and_preserve_rows_reuse_each_photo(tiny_sd_dir, photos):
    """Class row i is subject row i's photo with the class prompt, preserve rows the photo with a drawn general prompt."""
    cfg = make_cfg(tiny_sd_dir, photos, "unused", prior={**MODEL_PRIOR, **PRESERVE}, data={"random_flip": True})
    concepts = cfg.resolved_concepts()
    subject = subject_examples(concepts, cfg.data)
    data = DreamBoothData(subject, class_prompt_twins(subject, concepts), cfg.data, 0, preserve_prompts=PRESERVE["preserve_prompts"])
    drawn = set()
    for first in range(0, 20, 2):
        b = data.batch(first, 2, with_pixels=True)
        assert b.is_prior.tolist() == [False, False, True, True, False, False]
        assert b.is_preserve.tolist() == [False, False, False, False, True, True]
        for i in range(2):
            assert b.indices[2 + i] == ("class", b.indices[i][1]) and b.indices[4 + i] == b.indices[i]
            assert b.examples[2 + i].prompt == "a photo of a dog"
            assert torch.equal(b.pixels[2 + i], b.pixels[i]) and torch.equal(b.pixels[4 + i], b.pixels[i])  # same crop/flip
        drawn |= {e.prompt for e in b.examples[4:]}
        again = data.batch(first, 2, with_pixels=False)
        assert [e.prompt for e in again.examples] == [e.prompt for e in b.examples]  # a function of the position
    assert drawn == set(PRESERVE["preserve_prompts"])


def test_preservation_prompts_default_to_the_class_prompts(tiny_sd_dir, photos):
    cfg = make_cfg(tiny_sd_dir, photos, "unused", prior={"preserve_weight": 1.0})
    assert cfg.preservation_prompts() == ["a photo of a dog"]
    assert make_cfg(tiny_sd_dir, photos, "unused").preservation_prompts() == []


@pytest.mark.parametrize("prior, concept, message", [
    ({"source": "model", "enabled": False}, {"class_prompt": None}, "prior.source=model.*prior.enabled"),
    ({"source": "model"}, {"class_dir": "mine"}, "class_dir.*prior.source=model"),
    ({"preserve_prompts": ["a cat"]}, {}, "prior.preserve_prompts.*prior.preserve_weight"),
    ({"preserve_weight": -1.0}, {}, "prior.preserve_weight must be"),
    ({"preserve_weight": 1.0, "enabled": False}, {"class_prompt": None}, "prior.preserve_weight > 0 needs prompts"),
    ({"preserve_weight": 1.0, "preserve_prompts": ["a cat", " "]}, {}, "empty prompt"),
])
def test_bad_combinations_are_refused_up_front(tiny_sd_dir, photos, prior, concept, message):
    cfg = make_cfg(tiny_sd_dir, photos, "unused", prior=prior, concept=concept)
    with pytest.raises(DreamBoothError, match=message):
        cfg.validate()


# ---- the recipe ------------------------------------------------------------------------

def test_model_prior_generates_no_class_images(tiny_sd_dir, photos, tmp_path, monkeypatch):
    import dreambooth.data.prior as recipe

    def no_generation(*args, **kwargs):
        raise AssertionError("prior.source=model must not generate class images")

    monkeypatch.setattr(recipe, "ensure_class_images", no_generation)
    out = tmp_path / "out"
    result = train(make_cfg(tiny_sd_dir, photos, out, prior=MODEL_PRIOR, train={"max_steps": 2}))
    assert result.steps == 2 and not (out / "class_images").exists()
    assert "the base model's predictions on the class prompt" in (out / "README.md").read_text()


def test_step_one_distilled_losses_are_zero(tiny_sd_dir, photos, tmp_path):
    """Before the first update the trained model is the base: its distilled samples add exactly nothing, so
    any preservation weight gives the same first loss (the next steps differ)."""
    common = dict(prior={**MODEL_PRIOR, **PRESERVE}, train={"max_steps": 2}, optim={"lr_scheduler": "constant", "warmup_steps": 0})
    light = train(make_cfg(tiny_sd_dir, photos, tmp_path / "a", **common))
    heavy = train(make_cfg(tiny_sd_dir, photos, tmp_path / "b", **{**common, "prior": {**common["prior"], "loss_weight": 3.0,
                                                                                          "preserve_weight": 4.0}}))
    assert light.losses[1] == heavy.losses[1]
    assert light.losses[2] != heavy.losses[2]


# Regenerate after an intentional change to the recipe: run this test and copy "actual" from the failure.
GOLDEN_MODEL_PRIOR = [1.205989122390747, 1.1614466905593872, 1.0319373607635498, 0.9359441995620728]


def test_golden_losses_model_prior_and_preservation(tiny_sd_dir, photos, tmp_path):
    result = train(make_cfg(tiny_sd_dir, photos, tmp_path / "out", prior={**MODEL_PRIOR, **PRESERVE}))
    actual = [result.losses[s] for s in range(1, 5)]
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(GOLDEN_MODEL_PRIOR), rtol=1e-4, atol=0,
                               msg=lambda m: f"{m}\nactual: {actual}")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_exact_with_distilled_targets(tiny_sd_dir, photos, tmp_path, monkeypatch, method):
    """Model prior + knowledge preservation, text encoder trained until step 3, flips and crops: a crash at
    step 2 and a resume give the straight run's losses and weights bit for bit."""
    settings = dict(
        prior={**MODEL_PRIOR, **PRESERVE},
        train={"max_steps": 4, "method": method},
        checkpoint={"every_n_steps": 2},
        data={"random_flip": True, "center_crop": False},
        text_encoder={"stop_step": 3},
    )
    straight, resumed = straight_and_resumed(tiny_sd_dir, photos, tmp_path, monkeypatch, settings, crash_at=2)
    assert sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == [straight.losses[s] for s in (3, 4)]
    a, b = (tmp_path / "a" / "checkpoints" / "step-000004"), (tmp_path / "b" / "checkpoints" / "step-000004")
    from safetensors.torch import load_file

    wa, wb = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_copy_is_taken_before_training_changes_the_model(tiny_sd_dir):
    """A full fine-tune's base copy is independent of the trained weights (a deep copy, not a view)."""
    _, comps = _load(tiny_sd_dir)
    base = FrozenBase(comps, ["unet"], lora=False)
    before = copy.deepcopy(base.copies()["unet"].state_dict())
    _perturb(comps.modules["unet"].requires_grad_(True), seed=2)
    after = base.copies()["unet"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
