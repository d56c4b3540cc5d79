"""The moving average of the trained weights (ema.py): its maths by hand, the swap, and that export,
checkpoints and resume carry it (full fine-tune and LoRA, text encoder trained)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dreambooth import checkpoint as ckpt
from dreambooth.config import EMAConfig, to_dict
from dreambooth.ema import WeightAverage
from dreambooth.errors import DreamBoothError
from dreambooth.interop.exports import REPORT
from dreambooth.models.trainable import Trainable
from dreambooth.train import train

from test_train import _final_weights, make_cfg, straight_and_resumed


def tiny_trainable(dtype=torch.float32) -> tuple[torch.nn.Module, Trainable]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(dtype)
    return model, Trainable({"unet": dict(model.named_parameters())})


def take_steps(model, n: int, seed: int = 1):
    """Stand-in optimizer steps: move every weight by a random amount; yields the weights after each step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        yield {k: v.detach().double().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("warmup", [True, False])
def test_average_follows_the_formula(warmup):
    """average_n = d_n * average_{n-1} + (1 - d_n) * w_n, with d_1 = 0 (the first update copies) and
    d_n = min(decay, n / (n + 9)) with the warm-up, decay without: computed here in float64."""
    decay = 0.3  # the warm-up's n / (n + 9) passes it at n = 4: both regimes are covered
    model, trainable = tiny_trainable()
    average = WeightAverage(trainable, EMAConfig(enabled=True, decay=decay, warmup=warmup))
    expected = None
    for n, weights in enumerate(take_steps(model, 6), start=1):
        average.update()
        d = 0.0 if n == 1 else (min(decay, n / (n + 9)) if warmup else decay)
        expected = weights if expected is None else {k: d * expected[k] + (1 - d) * weights[k] for k in weights}
        got, updates = average.state_dict()
        assert updates == {"unet": n}
        for k in weights:
            torch.testing.assert_close(got[f"unet.{k}"].double(), expected[k], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got["unet.weight"].double(), weights["weight"])  # an average, not the last weights


def test_applied_swaps_the_average_in_and_the_trained_weights_back_exactly():
    model, trainable = tiny_trainable(torch.bfloat16)  # memory.weights_dtype=bf16: the average is still fp32
    average = WeightAverage(trainable, EMAConfig(enabled=True))
    for _ in take_steps(model, 3):
        average.update()  # after each step
    averaged, _ = average.state_dict()
    assert all(v.dtype == torch.float32 for v in averaged.values())
    trained = {k: v.detach().clone() for k, v in model.named_parameters()}
    with average.applied():
        for k, v in model.named_parameters():
            assert torch.equal(v, averaged[f"unet.{k}"].to(v.dtype)) and not torch.equal(v, trained[k])
    for k, v in model.named_parameters():
        assert torch.equal(v, trained[k])


def test_a_frozen_module_keeps_its_average():
    """A text encoder past its stop_step (requires_grad off) is no longer averaged; the others still are."""
    torch.manual_seed(0)
    unet, te = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    trainable = Trainable({"unet": dict(unet.named_parameters()), "text_encoder": dict(te.named_parameters())})
    average = WeightAverage(trainable, EMAConfig(enabled=True))
    list(take_steps(unet, 1)), list(take_steps(te, 1, seed=2))
    average.update()
    trainable.freeze("text_encoder")
    before, _ = average.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    list(take_steps(unet, 1)), list(take_steps(te, 1, seed=2))  # (a frozen module does not move in training; here it may)
    average.update()
    after, updates = average.state_dict()
    assert updates == {"unet": 2, "text_encoder": 1}
    assert torch.equal(after["text_encoder.weight"], before["text_encoder.weight"])
    assert not torch.equal(after["unet.weight"], before["unet.weight"])


def test_disabled_is_a_no_op():
    model, trainable = tiny_trainable()
    average = WeightAverage(trainable, EMAConfig(enabled=False))
    list(take_steps(model, 1))
    average.update()
    with average.applied():
        pass
    assert not average.enabled and average.state_dict() == ({}, {})


def test_full_fine_tune_exports_the_average(tiny_sd_dir, photos, tmp_path):
    """Exported UNet and text-encoder tensors are the final checkpoint's averages, not its trained weights."""
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, ema={"enabled": True}, train={"max_steps": 3},
                   checkpoint={"every_n_steps": 3}))
    final = out / "checkpoints" / "step-000003"
    averaged, trained = load_file(final / "ema.safetensors"), load_file(final / "trainable.safetensors")
    assert averaged.keys() == trained.keys()
    exported = {**{f"unet.{k}": v for k, v in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").items()},
                **{f"text_encoder.{k}": v for k, v in load_file(out / "text_encoder" / "model.safetensors").items()}}
    assert averaged.keys() <= exported.keys()
    for name in averaged:
        assert torch.equal(exported[name], averaged[name]), name
    assert sum(not torch.equal(averaged[n], trained[n]) for n in averaged) > len(averaged) // 2
    assert json.loads((out / REPORT).read_text())["passed"]  # the export loads back as the averaged model
    assert "moving average" in (out / "README.md").read_text()


def test_lora_with_average_end_to_end(tiny_sd_dir, photos, tmp_path):
    """LoRA + text-encoder LoRA + EMA: the written adapters are the averaged ones, and the export
    verification (load_lora_weights on a fresh base, outputs compared with the model) passes."""
    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, ema={"enabled": True}, train={"max_steps": 3, "method": "lora"},
                   checkpoint={"every_n_steps": 3}))
    final = out / "checkpoints" / "step-000003"
    averaged, trained = load_file(final / "ema.safetensors"), load_file(final / "trainable.safetensors")
    assert any(k.startswith("text_encoder.") for k in averaged)
    exported = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(exported) == len(averaged)
    # diffusers renames the adapters on the way out; the tensors themselves are matched by value
    by_value = lambda tensors: {(tuple(v.shape), v.float().numpy().tobytes()) for v in tensors.values()}  # noqa: E731
    assert by_value(exported) == by_value(averaged)
    assert not by_value(exported) & by_value({k: v for k, v in trained.items() if not torch.equal(v, averaged[k])})
    report = json.loads((out / REPORT).read_text())
    assert report["passed"], report


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_with_average_is_exact(tiny_sd_dir, photos, tmp_path, monkeypatch, method):
    """6 steps in one go == 2, a crash, a resume, 4 more, with the average on: the exported (averaged)
    weights and the last checkpoint's averages are bitwise equal. A text encoder that stops at step 3
    exercises a module whose average stops with it."""
    settings = dict(train={"max_steps": 6, "method": method}, checkpoint={"every_n_steps": 2},
                    text_encoder={"stop_step": 3}, ema={"enabled": True})
    straight, resumed = straight_and_resumed(tiny_sd_dir, photos, tmp_path, monkeypatch, settings, crash_at=2)
    assert [resumed.losses[s] for s in range(3, 7)] == [straight.losses[s] for s in range(3, 7)]
    a, b = _final_weights(tmp_path / "a", method), _final_weights(tmp_path / "b", method)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ema_a, ema_b = (load_file(tmp_path / run / "checkpoints" / "step-000006" / "ema.safetensors") for run in "ab")
    assert ema_a.keys() == ema_b.keys() and ema_a
    for name in ema_a:
        assert torch.equal(ema_a[name], ema_b[name]), name


def test_resume_refuses_to_switch_the_average_on(tiny_sd_dir, photos, tmp_path):
    """A checkpoint made without the average has none to continue: switching ema on (or its settings) is refused."""
    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "out")
    checkpoint = tmp_path / "step-000002"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "model_fingerprint": "f"}))
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert ckpt.check_resume_compatible(checkpoint, cfg, "f") == 2
    with pytest.raises(DreamBoothError, match="ema changed"):
        ckpt.check_resume_compatible(checkpoint, make_cfg(tiny_sd_dir, photos, tmp_path / "out", ema={"enabled": True}), "f")


def test_validation_renders_the_average_and_training_goes_on_from_the_trained_weights(tiny_sd_dir, photos, tmp_path,
                                                                                       monkeypatch):
    """The validation grid during training (step 2) and at the end (step 3) is drawn with the averages;
    training after the mid-run validation continues from the trained weights (its losses are those of a
    run without validation)."""
    import dreambooth.train as recipe

    seen = {}
    real = recipe.validate

    def recording_validate(comps, vcfg, resolution, samples_dir, step, *args, **kwargs):
        seen[step] = {f"unet.{k}": v.detach().clone() for k, v in comps.modules["unet"].named_parameters()
                      if v.requires_grad}
        return real(comps, vcfg, resolution, samples_dir, step, *args, **kwargs)

    monkeypatch.setattr(recipe, "validate", recording_validate)
    settings = dict(ema={"enabled": True}, train={"max_steps": 3}, checkpoint={"every_n_steps": 1, "keep": 3})
    validated = train(make_cfg(tiny_sd_dir, photos, tmp_path / "v", **settings,
                               validation={"prompts": ["a photo of sks dog"], "every_n_steps": 2, "num_images": 1,
                                           "num_inference_steps": 2}))
    assert sorted(seen) == [2, 3]
    for step in (2, 3):
        folder = tmp_path / "v" / "checkpoints" / f"step-{step:06d}"
        averaged, trained = load_file(folder / "ema.safetensors"), load_file(folder / "trainable.safetensors")
        assert seen[step].keys() == {k for k in averaged if k.startswith("unet.")}
        for name, value in seen[step].items():
            assert torch.equal(value, averaged[name]), name
        assert any(not torch.equal(averaged[n], trained[n]) for n in seen[step])
    plain = train(make_cfg(tiny_sd_dir, photos, tmp_path / "p", **settings))
    assert validated.losses == plain.losses  # bitwise: the trained weights came back exactly


def test_select_best_with_the_average_is_refused_up_front():
    from dreambooth.config import build_config

    with pytest.raises(DreamBoothError, match="train.select=best with ema.enabled is not supported"):
        build_config({"model": {"path": "m"}, "concept": {"instance_dir": "d", "instance_prompt": "a sks dog"},
                      "train": {"select": "best"}, "ema": {"enabled": True},
                      "checkpoint": {"every_n_steps": 10}, "monitor": {"every_n_steps": 10}}).validate()
