"""The model card is published text: its base_model is a Hub id or absent, it names no local path, and
the UI shows its front matter as the Hub does (a small table), not as one large heading."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth.config import build_config
from dreambooth.errors import DreamBoothError
from dreambooth.export import base_hub_id, model_card
from dreambooth.models.load import FAMILIES, check_settings
from dreambooth.ui.app import card_for_display

HUB = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def card(model_path, out, method="full", base_dir=None, **model):
    cfg = build_config({"model": {"path": str(model_path), **model},
                        "concept": {"instance_dir": "/home/me/photos/rex", "instance_prompt": "a photo of sks dog"},
                        "train": {"method": method, "output_dir": str(out)}})
    return model_card(cfg, FAMILIES["sd"], None, SimpleNamespace(steps=2), Path(out), base_dir)


def front_matter(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0] == "---"
    return lines[1:lines.index("---", 1)]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_local_base_has_no_base_model_and_no_path_in_the_card(method):
    text = card("/home/me/models/sd15", "/home/me/runs/rex", method)
    assert not [line for line in front_matter(text) if line.startswith("base_model")]
    assert "/home/me" not in text, text  # not the base's path, the photos' or the output's
    assert "# DreamBooth " in text and "of `sd15`" in text  # the base by its folder's name
    if method == "lora":
        assert 'from_pretrained("sd15")' in text and "set model.hub_id" in text


def test_the_hub_id_comes_from_the_setting_or_the_hub_cache_path(tmp_path):
    assert f"base_model: {HUB}" in front_matter(card("/home/me/models/sd15", tmp_path / "o", hub_id=HUB))
    cached = tmp_path / "hf" / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / "451f4fe"
    text = card(cached, tmp_path / "o", "lora")
    assert f"base_model: {HUB}" in front_matter(text) and f'from_pretrained("{HUB}")' in text
    assert str(tmp_path) not in text
    blob = tmp_path / "hf" / "hub" / "models--org--a-model" / "blobs" / "0f3a"  # a single file's resolved link
    assert base_hub_id(str(blob), None) == "org/a-model"
    assert base_hub_id("/data/models/sd15", None, tmp_path / "cache" / "single-file" / "ab12") is None


def test_a_hub_id_that_is_not_org_slash_name_is_refused(tiny_sd_dir):
    cfg = build_config({"model": {"path": str(tiny_sd_dir), "hub_id": "/home/me/models/sd15"}})
    with pytest.raises(DreamBoothError, match=r"model.hub_id must be a Hugging Face Hub id, ORG/NAME .* got "
                                              r"'/home/me/models/sd15'; a local path goes in model.path"):
        check_settings(cfg, FAMILIES["sd"], tiny_sd_dir)


def test_the_ui_shows_the_front_matter_as_a_table_not_a_heading():
    shown = card_for_display(card("/x/sd15", "/x/out", hub_id=HUB))
    assert shown.startswith("| card | |\n|---|---|\n| library_name | diffusers |\n")
    assert f"| base_model | {HUB} |" in shown and "| tags | dreambooth, text-to-image, stable-diffusion |" in shown
    assert "\n---\n" not in shown and "library_name: diffusers" not in shown  # no setext underline left
    assert "\n# DreamBooth fine-tune of" in shown
    assert card_for_display("# plain\n\ntext") == "# plain\n\ntext"  # a card without front matter, as it is
