"""Interop asks the family: probe inputs for export verification, kohya prefixes, single-file tables, and
the pipeline call that renders every export's one image (SD, SDXL and both IF stages)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from dreambooth.interop import single_file as sf
from dreambooth.interop.kohya import kohya_state_dict
from dreambooth.interop.verify import Verification, compare
from dreambooth.models.load import FAMILIES
from dreambooth.train import train

from test_single_file import make_cfg


class TransformerFamily:
    """What verification needs of a family whose denoiser is a transformer (SD3's MMDiT, in miniature)."""

    denoiser = "transformer"
    text_encoders = ()

    def probe_inputs(self, module_name, config, generator):
        return {"hidden_states": torch.randn(1, config.in_channels, 8, 8, generator=generator),
                "encoder_hidden_states": torch.randn(1, 6, config.joint_attention_dim, generator=generator),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
                "timestep": torch.tensor([500])}


def test_verification_probes_a_transformer_denoiser_with_its_familys_inputs():
    """A transformer has no cross_attention_dim: the probe's inputs are the family's, so the comparison runs
    (equal copies: bitwise) and still catches one changed weight."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
    fam, report = TransformerFamily(), Verification()
    compare(report, "transformer", fam, "transformer", model, copy.deepcopy(model))
    assert report.checks == ["transformer: max abs diff 0 (bitwise)"] and not report.problems
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.proj_out.weight.add_(0.1)
    compare(report, "changed", fam, "transformer", model, changed, relative=1e-5)
    assert len(report.problems) == 1 and report.problems[0].startswith("changed differs by")


def test_kohya_prefixes_are_the_familys(tiny_sd_dir):
    """The kohya names come from the family's table, for a denoiser of any name (kohya calls FLUX.1's
    transformer lora_unet too)."""
    from peft import LoraConfig

    unet = sf.saved_part(tiny_sd_dir, "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=["to_q"]))
    fam = SimpleNamespace(kohya_prefixes={"transformer": "lora_unet"}, text_encoders=())
    state = kohya_state_dict({"transformer": unet}, ["transformer"], fam)
    layers = {k.split(".")[0] for k in state}
    assert layers and all(k.startswith("lora_unet_") and k.endswith("_to_q") for k in layers)
    assert {k.split(".", 1)[1] for k in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {3.0}
    fam.kohya_prefixes = {"transformer": "lora_transformer"}
    assert all(k.startswith("lora_transformer_") for k in kohya_state_dict({"transformer": unet}, ["transformer"], fam))


def test_single_file_tables_are_the_familys(tiny_sd_dir):
    unet = sf.saved_part(tiny_sd_dir, "unet")
    fam = SimpleNamespace(single_file={"denoiser": "model.diffusion_model."}, single_file_tables={"denoiser": "unet"})
    ours = sf.original_state_dict({"denoiser": unet}, fam)
    sd = sf.original_state_dict({"unet": unet, "vae": sf.saved_part(tiny_sd_dir, "vae"),
                                 "text_encoder": sf.saved_part(tiny_sd_dir, "text_encoder")}, FAMILIES["sd"])
    assert ours.keys() == {k for k in sd if k.startswith("model.diffusion_model.")}
    fam.single_file_tables = {"denoiser": "mmdit"}
    with pytest.raises(ValueError, match=r"no single-file table 'mmdit' for UNet2DConditionModel; known: unet, vae, text"):
        sf.original_state_dict({"denoiser": unet}, fam)


@pytest.mark.parametrize("model, method, sections, pipeline, side", [
    ("tiny_sd_dir", "full", {}, "StableDiffusionPipeline", 8),
    ("tiny_sdxl_dir", "full", {}, "StableDiffusionXLPipeline", 8),
    ("tiny_if_dir", "full", {"export": {"save_text_encoder": False}}, "IFPipeline", 8),  # rendered from T5 states
    ("tiny_if2_dir", "lora", {"data": {"resolution": 64}}, "IFSuperResolutionPipeline", 8),
])
def test_every_familys_export_ends_by_rendering_as_a_user_loads_it(request, photos, tmp_path, model, method, sections,
                                                                   pipeline, side):
    out = tmp_path / "out"
    train(make_cfg(request.getfixturevalue(model), photos, out, train={"method": method, "max_steps": 1},
                   text_encoder={"train": False}, **sections))
    report = json.loads((out / "verification.json").read_text())
    renders = [c for c in report["checks"] if "rendered" in c]
    loaded = f"{pipeline}.from_pretrained(output)" if method == "full" else \
        f"pytorch_lora_weights.safetensors on {pipeline}.from_pretrained(base)"
    assert report["passed"] and renders == [f"{loaded}: rendered a {side}x{side} image in 2 steps"], report


def test_an_export_that_does_not_render_fails_verification(tiny_sd_dir, photos, tmp_path, monkeypatch):
    from dreambooth.errors import DreamBoothError

    fam = FAMILIES["sd"]
    monkeypatch.setattr(type(fam), "render_inputs", lambda self, pipe: {"prompt": "a dog", "height": 12, "width": 12})
    with pytest.raises(DreamBoothError, match=r"does not load back as trained: StableDiffusionPipeline.from_pretrained"
                                              r"\(output\): ValueError: `height` and `width` have to be divisible by 8"):
        train(make_cfg(tiny_sd_dir, photos, tmp_path / "out", train={"max_steps": 1}))
