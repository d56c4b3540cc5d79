"""`dreambooth identifier`: rare single-token identifiers, rendered and measured against the class prompt."""

import json

import pytest
from PIL import Image
from transformers import CLIPTokenizer, T5Tokenizer

from dreambooth.cli import main
from dreambooth.errors import DreamBoothError
from dreambooth.identifier import COMMON_WORDS, IdentifierSettings, rare_candidates
from dreambooth.miniworld.evaluate import DEFAULT_BASE
from dreambooth.tiny import T5_TOKENIZER_DIR, TOKENIZER_DIR, build_tiny_clip


def test_candidates_are_rare_single_tokens_and_never_common_words():
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    found = rare_candidates({"tokenizer": tok}, IdentifierSettings(noun="dog", num_candidates=6))
    assert len(found) == 6
    ids = [c.ids["tokenizer"][0] for c in found]
    assert ids == sorted(ids, reverse=True) and min(ids) >= len(tok) // 2  # rarest first, from the rarer half
    for c in found:
        assert c.single and tok.decode(c.ids["tokenizer"]) == c.token and c.token.isalpha() and len(c.token) <= 3
        assert c.token not in COMMON_WORDS
    # "ok" is a single token in that range, so only the common-word list keeps it out.
    ok = tok("ok", add_special_tokens=False).input_ids
    assert len(ok) == 1 and ok[0] > min(ids) and "ok" in COMMON_WORDS and "ok" not in [c.token for c in found]
    with pytest.raises(DreamBoothError, match="unknown field"):
        IdentifierSettings(noun="dog", template="a photo of {tok} {noun}")
    with pytest.raises(DreamBoothError, match="at least 2"):
        IdentifierSettings(noun="dog", num_images=1)
    again = rare_candidates({"tokenizer": tok}, IdentifierSettings(noun="dog", num_candidates=6, exclude=(found[0].token,)))
    assert [c.token for c in again][:5] == [c.token for c in found][1:]


def test_a_candidate_is_one_token_in_every_tokenizer():
    clip, t5 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR), T5Tokenizer.from_pretrained(T5_TOKENIZER_DIR)
    settings = IdentifierSettings(noun="dog", num_candidates=1000, max_length=6)
    alone = rare_candidates({"clip": clip}, settings)
    both = rare_candidates({"clip": clip, "t5": t5}, settings)
    assert both and len(both) < len(alone)  # the second tokenizer splits some of CLIP's tokens
    for c in both:
        assert len(t5(c.token, add_special_tokens=False).input_ids) == 1


def test_identifier_on_the_tiny_model_with_clip(tiny_sd_dir, tmp_path, capsys):
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "ident"
    assert main(["identifier", "--model", str(tiny_sd_dir), "--class-noun", "dog", "--num-candidates", "2", "--token", "sks",
                 "--num-images", "2", "--steps", "2", "--scheduler", "ddim", "--clip", str(clip), "--out-dir", str(out)]) == 0
    result = json.loads((out / "identifier.json").read_text())
    assert result["measure"] == "clip" and list(result["tokenizers"]) == ["tokenizer"]
    tokens = [c["token"] for c in result["candidates"]]
    assert len(tokens) == 3 and tokens[-1] == "sks"  # the tiny vocabulary splits "sks": listed last, not one token
    assert not result["candidates"][-1]["single"] and all(c["single"] for c in result["candidates"][:2])
    for c in result["candidates"]:
        assert isinstance(c["association"], float) and set(c["details"]) == {"class_vs_class", "token_vs_class"}
        assert Image.open(out / "tokens" / f"{c['token']}.png").size == (2 * 32, 2 * 32)  # its row over the class row
    assert Image.open(out / "grid.png").size == (2 * 32, 4 * 32)  # the class row, then one row per token
    assert "not one token" in capsys.readouterr().out


def test_identifier_in_the_miniature_world_uses_the_classifier(tmp_path):
    out = tmp_path / "ident"
    assert main(["identifier", "--model", str(DEFAULT_BASE), "--class-noun", "toy", "--num-candidates", "2",
                 "--num-images", "2", "--steps", "2", "--scheduler", "ddim", "--out-dir", str(out)]) == 0
    result = json.loads((out / "identifier.json").read_text())
    assert result["measure"] == "classifier" and result["threshold"] == 0.25
    for c in result["candidates"]:
        tv = c["details"]["total_variation"]
        assert set(tv) == {"shape", "colour", "subject"} and all(0.0 <= v <= 1.0 for v in tv.values())
        assert c["association"] == max(tv.values()) and c["flagged"] == (c["association"] > 0.25)
        assert len(c["details"]["token_labels"]["shape"]) == 2


def test_sdxl_candidates_are_single_in_both_tokenizers(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "ident"
    assert main(["identifier", "--model", str(tiny_sdxl_dir), "--class-noun", "dog", "--num-candidates", "3",
                 "--no-render", "--out-dir", str(out)]) == 0
    result = json.loads((out / "identifier.json").read_text())
    assert list(result["tokenizers"]) == ["tokenizer", "tokenizer_2"]
    assert len(result["candidates"]) == 3
    for c in result["candidates"]:
        assert set(c["ids"]) == {"tokenizer", "tokenizer_2"} and all(len(v) == 1 for v in c["ids"].values())
    assert not (out / "grid.png").exists()
