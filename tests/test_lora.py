"""What trains: LoRA adapters (peft) or all UNet weights, and the LoRA maths W0 x + (alpha / r) B A x (Hu et al. 2021)."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from dreambooth.config import build_config
from dreambooth.models.load import load_components
from dreambooth.models.trainable import setup_trainable as _setup_trainable


def make_config(tiny_sd_dir, **dotted):
    layer = {"model": {"path": str(tiny_sd_dir)}, "concept": {"instance_dir": "d", "instance_prompt": "a photo of sks dog"}}
    for key, value in dotted.items():
        section, name = key.split(".")
        layer.setdefault(section, {})[name] = value
    return build_config(layer).validate()


def setup_trainable(comps, cfg):
    return _setup_trainable(comps, cfg.train.method, cfg.lora, cfg.text_encoders(), cfg.memory.weights_dtype)


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    return latents, torch.tensor([10, 700]), hidden


def unet_out(unet):
    latents, t, hidden = unet_inputs()
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=hidden).sample


def lora_layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer)}


def test_lora_trains_only_adapters(tiny_sd_dir):
    comps = load_components(tiny_sd_dir)
    cfg = make_config(tiny_sd_dir, **{"train.method": "lora", "text_encoder.train": True, "lora.rank": 2})
    trainable = setup_trainable(comps, cfg)
    for module, chosen in ((comps.unet, trainable.params['unet']), (comps.text_encoder, trainable.params.get('text_encoder', {}))):
        grads = {n for n, p in module.named_parameters() if p.requires_grad}
        assert grads, "no trainable parameters"
        assert all("lora" in n for n in grads), sorted(n for n in grads if "lora" not in n)
        assert set(chosen) == grads
        assert all(p.dtype == torch.float32 for p in chosen.values())
        # the frozen base weights are all still there and frozen
        assert any(not p.requires_grad for n, p in module.named_parameters() if "lora" not in n)
    # adapters sit exactly on the configured target modules, each with rank r
    unet_targets = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in lora_layers(comps.unet)}
    assert unet_targets == {"to_q", "to_k", "to_v", "to_out.0"}
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(comps.text_encoder)} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(m.r["default"] == 2 for m in lora_layers(comps.unet).values())
    expected = sum(p.numel() for p in comps.unet.parameters() if p.requires_grad) + \
        sum(p.numel() for p in comps.text_encoder.parameters() if p.requires_grad)
    assert trainable.count() == expected
    # by hand: each adapted Linear(in, out) adds r * (in + out) weights
    by_hand = sum(2 * (m.in_features + m.out_features)
                  for mod in (comps.unet, comps.text_encoder) for m in lora_layers(mod).values())
    assert trainable.count() == by_hand
    assert set(trainable.named()) == {f"unet.{n}" for n in trainable.params['unet']} | {f"text_encoder.{n}" for n in trainable.params.get('text_encoder', {})}


def test_lora_leaves_text_encoder_alone_unless_asked(tiny_sd_dir):
    comps = load_components(tiny_sd_dir)
    trainable = setup_trainable(comps, make_config(tiny_sd_dir, **{"train.method": "lora"}))
    assert trainable.params.get('text_encoder', {}) == {}
    assert not lora_layers(comps.text_encoder)
    assert not any(p.requires_grad for p in comps.text_encoder.parameters())
    assert trainable.params['unet'] and all("lora" in n for n in trainable.params['unet'])


def test_full_trains_all_unet_weights(tiny_sd_dir):
    comps = load_components(tiny_sd_dir)
    trainable = setup_trainable(comps, make_config(tiny_sd_dir))
    assert set(trainable.params['unet']) == {n for n, _ in comps.unet.named_parameters()}
    assert all(p.requires_grad for p in comps.unet.parameters())
    assert trainable.params.get('text_encoder', {}) == {}
    assert not any(p.requires_grad for p in comps.text_encoder.parameters())
    assert not any(p.requires_grad for p in comps.vae.parameters())
    assert trainable.count() == sum(p.numel() for p in comps.unet.parameters())
    assert not lora_layers(comps.unet)


def test_full_with_text_encoder_and_freezing_it(tiny_sd_dir):
    comps = load_components(tiny_sd_dir)
    trainable = setup_trainable(comps, make_config(tiny_sd_dir, **{"text_encoder.train": True}))
    assert set(trainable.params.get('text_encoder', {})) == {n for n, _ in comps.text_encoder.named_parameters()}
    assert trainable.count() == sum(p.numel() for p in comps.unet.parameters()) + \
        sum(p.numel() for p in comps.text_encoder.parameters())
    for p in trainable.params.get('text_encoder', {}).values():
        p.grad = torch.ones_like(p)
    trainable.freeze("text_encoder")
    assert not any(p.requires_grad or p.grad is not None for p in comps.text_encoder.parameters())
    assert all(p.requires_grad for p in comps.unet.parameters())


def test_lora_output_unchanged_at_init(tiny_sd_dir):
    fresh = load_components(tiny_sd_dir).unet
    comps = load_components(tiny_sd_dir)
    setup_trainable(comps, make_config(tiny_sd_dir, **{"train.method": "lora"}))
    assert lora_layers(comps.unet)
    # A is random (gaussian init), B is zero, so B A x = 0
    layer = next(iter(lora_layers(comps.unet).values()))
    assert layer.lora_A["default"].weight.abs().sum() > 0
    assert torch.all(layer.lora_B["default"].weight == 0)
    torch.testing.assert_close(unet_out(comps.unet), unet_out(fresh), rtol=0, atol=0)


@pytest.fixture
def perturbed_lora_unet(tiny_sd_dir):
    """A LoRA UNet (r=4, alpha=8: scale 2) whose B matrices are random, so the adapters do something."""
    comps = load_components(tiny_sd_dir)
    setup_trainable(comps, make_config(tiny_sd_dir, **{"train.method": "lora", "lora.rank": 4, "lora.alpha": 8.0}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(comps.unet).values():
            b = layer.lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return comps.unet


def test_lora_perturbed_changes_output(tiny_sd_dir, perturbed_lora_unet):
    fresh = load_components(tiny_sd_dir).unet
    before, after = unet_out(fresh), unet_out(perturbed_lora_unet)
    assert (after - before).abs().max() > 1e-3


def test_lora_layer_is_w0_plus_scaled_ba(perturbed_lora_unet):
    name, layer = next((n, m) for n, m in lora_layers(perturbed_lora_unet).items() if n.endswith("attn1.to_q"))
    assert layer.scaling["default"] == pytest.approx(2.0)  # alpha / r
    w0 = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        merged = x @ (w0 + 2.0 * b @ a).T
        if layer.base_layer.bias is not None:
            merged = merged + layer.base_layer.bias
        torch.testing.assert_close(layer(x), merged, rtol=1e-5, atol=1e-5)


def test_lora_merged_equals_unmerged(perturbed_lora_unet):
    unmerged = unet_out(perturbed_lora_unet)
    layer = next(iter(lora_layers(perturbed_lora_unet).values()))
    w0 = layer.base_layer.weight.detach().clone()
    expected_w = w0 + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    perturbed_lora_unet.fuse_lora()  # diffusers: W <- W0 + scale * B A in every adapted layer
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected_w.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unet_out(perturbed_lora_unet), unmerged, rtol=0, atol=1e-5)
