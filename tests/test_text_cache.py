"""Prompt embeddings computed once, stored with their provenance, and frozen text encoders kept off the
device (memory.offload_text_encoders) with validation rendering from the cached embeddings."""

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from dreambooth.config import build_config
from dreambooth.errors import DreamBoothError
from dreambooth.train import train


def make_cfg(model, photos, out, **sections):
    base = {
        "model": {"path": str(model)},
        "concept": {"instance_dir": str(photos), "instance_prompt": "a photo of sks dog"},
        "data": {"resolution": 32 if "if-ii" not in str(model) else 64, "min_size": 16},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 2, "batch_size": 1, "output_dir": str(out)},
        "validation": {"prompts": ["a photo of sks dog", "a dog"], "num_images": 2, "num_inference_steps": 2},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


@pytest.mark.parametrize("model", ["tiny_sd_dir", "tiny_sdxl_dir", "tiny_if_dir"])
def test_offloaded_encoders_render_the_same_validation_grid(model, photos, tmp_path, request, monkeypatch):
    """Cached embeddings (incl. SDXL's pooled ones and its zeroed empty negative prompt) through the
    pipeline's *_embeds arguments give the grid the text encoders themselves give."""
    import dreambooth.validation as validation

    model = request.getfixturevalue(model)
    real, calls = validation.generate, []
    monkeypatch.setattr(validation, "generate", lambda *a, **k: calls.append(sorted(k["inputs"])) or real(*a, **k))
    grids = {}
    for offload in (False, True):
        out = tmp_path / str(offload)
        train(make_cfg(model, photos, out, memory={"offload_text_encoders": offload}))
        grids[offload] = np.asarray(Image.open(out / "samples" / "step-000002.png"), dtype=np.int16)
    assert "prompt_embeds" not in calls[0] and "negative_prompt_embeds" in calls[1]  # the second ran no text encoder
    assert grids[True].shape == grids[False].shape
    assert np.abs(grids[True] - grids[False]).max() <= 1  # batched matmuls may round a pixel by one level


def test_embeddings_are_stored_with_provenance_and_reused(tiny_sd_dir, photos, tmp_path, monkeypatch):
    from dreambooth.models.sd import StableDiffusionFamily

    out = tmp_path / "out"
    train(make_cfg(tiny_sd_dir, photos, out, checkpoint={"every_n_steps": 2}))
    store = out / "cache" / "text-embeddings.safetensors"
    with safe_open(str(store), framework="pt") as f:
        import json

        provenance = json.loads(f.metadata()["provenance"])
    assert provenance["family"] == "sd" and len(provenance["model_fingerprint"]) == 64
    assert set(provenance["prompts"]) == {"a photo of sks dog", "a dog", ""}  # training, validation, negative

    calls = []
    real = StableDiffusionFamily.encode_prompt
    monkeypatch.setattr(StableDiffusionFamily, "encode_prompt", lambda self, c, p: calls.append(p) or real(self, c, p))
    train(make_cfg(tiny_sd_dir, photos, out, train={"max_steps": 3, "resume": True}, checkpoint={"every_n_steps": 2}))
    assert all(p != ["a photo of sks dog"] for p in calls)  # the resumed run read the training prompt's embedding
    # a new prompt is not covered by the store: everything is encoded afresh and stored again
    calls.clear()
    train(make_cfg(tiny_sd_dir, photos, tmp_path / "other", validation={"prompts": ["a cat"]}))
    assert ["a photo of sks dog"] in calls


def test_offloading_needs_cached_embeddings(tiny_sd_dir, photos, tmp_path):
    cfg = make_cfg(tiny_sd_dir, photos, tmp_path / "o", memory={"offload_text_encoders": True}, text_encoder={"train": True})
    with pytest.raises(DreamBoothError, match="offload_text_encoders=true needs the text embeddings cached"):
        cfg.validate()
